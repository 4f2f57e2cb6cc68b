"""Streams: a pass on two 1-thread streams gives exactly the one-stream results, in table order."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from qbreak.kl import CompareStatistic, GroupCompareStatistic
from qbreak.lens import LogitLensStatistic
from qbreak.nll import NLLStatistic, per_example_nll
from qbreak.hooks import hooks
from qbreak.passes import (
    Batch,
    ModelState,
    default_streams,
    iter_batches,
    run_group_pass,
    run_pair_pass,
    run_pass,
)
from qbreak.residuals import AmplificationStatistic, ResidualStatistic
from tests.conftest import make_tiny_llama, perturbed_copy
from tests.test_kl import _examples


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    fp = make_tiny_llama(seed=5)
    return fp, perturbed_copy(fp, scale=0.1, seed=6)


@pytest.fixture()
def two_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_default_streams_follow_the_threads(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert default_streams(fp) == 1
        torch.set_num_threads(2)
        assert default_streams(fp) == 2
    finally:
        torch.set_num_threads(before)


def test_two_streams_give_the_one_stream_nll(pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None) -> None:
    fp, _ = pair
    examples = _examples(n=11, max_len=30)  # batches of 2: six batches, the last one short
    one = per_example_nll(fp, examples, "tiny", "fp", batch_size=2, streams=1)
    two = per_example_nll(fp, examples, "tiny", "fp", batch_size=2, streams=2)
    assert two.column("example_id").to_pylist() == examples.column("example_id").to_pylist()
    np.testing.assert_array_equal(two.column("nll").to_numpy(), one.column("nll").to_numpy())
    assert torch.get_num_threads() == 2  # the pass restores the job's thread count


class _Recorder:
    """A hook-free statistic that records, per batch, the thread it ran in and its torch threads."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seen: list[tuple[list[int], str, int]] = []
        self.fail_at = fail_at

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        if len(self.seen) == self.fail_at:
            raise RuntimeError("statistic failed")
        self.seen.append((batch.example_ids.tolist(), threading.current_thread().name, torch.get_num_threads()))


def test_streams_feed_statistics_in_batch_order_on_one_thread_each(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, _ = pair
    examples = _examples(n=9)
    recorder = _Recorder()
    run_pass(fp, iter_batches(examples, 2), [recorder], streams=2)
    expected = [batch.example_ids.tolist() for batch in iter_batches(examples, 2)]
    assert [ids for ids, _, _ in recorder.seen] == expected
    assert {name.startswith("qbreak-stream") for _, name, _ in recorder.seen} == {True}
    assert {threads for _, _, threads in recorder.seen} == {1}


def test_a_failing_stream_raises_and_restores_the_threads(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, _ = pair
    recorder = _Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="statistic failed"):
        run_pass(fp, iter_batches(_examples(n=12), 2), [recorder], streams=2)
    assert len(recorder.seen) == 2
    assert torch.get_num_threads() == 2


class _ThreadNames:
    """A hooked statistic without per-forward state: it records the threads its hook fired in."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[None]:
        with hooks(model, {(0, "block_out"): self._record}):
            yield

    def _record(self, x: torch.Tensor) -> None:
        self.threads.add(threading.current_thread().name)

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        pass


def test_hook_statistics_run_on_streams_only_when_stream_safe(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, _ = pair
    examples = _examples(n=7)
    results = []
    for streams in (1, 2):
        nll, residuals = NLLStatistic("tiny", "fp"), ResidualStatistic("tiny", "fp")
        lens, threads = LogitLensStatistic("tiny", "fp"), _ThreadNames()
        run_pass(fp, iter_batches(examples, 2), [nll, residuals, lens], streams=streams)
        run_pass(fp, iter_batches(examples, 2), [threads], streams=streams)
        results.append((nll.result(), residuals.result(), lens.result(), residuals.mean_abs_per_dim(), threads.threads))
    (*one, abs_one, threads_one), (*two, abs_two, threads_two) = results
    for table_one, table_two in zip(one, two, strict=True):
        assert table_two.equals(table_one)
    assert abs_two.keys() == abs_one.keys()
    for layer, values in abs_one.items():
        np.testing.assert_array_equal(abs_two[layer], values)
    # a hooked statistic that is not stream-safe keeps one forward at a time, in the caller's thread
    assert threads_one == threads_two == {threading.current_thread().name}


def test_stream_safe_hooks_run_in_the_streams(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, _ = pair
    residuals = ResidualStatistic("tiny", "fp")
    seen: set[str] = set()
    with hooks(fp, {(1, "pre_norm"): lambda x: seen.add(threading.current_thread().name)}):
        run_pass(fp, iter_batches(_examples(n=7), 2), [residuals], streams=2)
    assert seen and {name.startswith("qbreak-stream") for name in seen} == {True}
    assert residuals.result().num_rows == 7 * 2 * 3  # examples × layers × sites


def test_two_stream_pair_pass_equals_one_stream(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, q = pair
    examples = _examples(n=9, max_len=25)
    results = []
    for streams in (1, 2):
        compare = CompareStatistic("tiny", "q", topk=8)
        residuals = ResidualStatistic("tiny", "q")
        amplification = AmplificationStatistic("tiny", "q", q)
        run_pair_pass(
            fp, q, iter_batches(examples, 2), [compare], fp_statistics=[amplification], q_statistics=[residuals],
            streams=streams,
        )
        results.append((compare.kl_table(), compare.nll_table(), residuals.result(), amplification.result()))
        assert torch.get_num_threads() == 2
    for one, two in zip(*results, strict=True):
        assert two.equals(one)


class _PairRecorder:
    """A pair statistic that records, per batch, its examples, the thread it ran in and whether both
    models' states came with it."""

    def __init__(self, fp: torch.nn.Module, q: torch.nn.Module, fail_at: int | None = None) -> None:
        self.fp, self.q, self.fail_at = fp, q, fail_at
        self.seen: list[tuple[list[int], str, bool]] = []

    def update(self, batch: Batch, fp: ModelState, q: ModelState) -> None:
        if len(self.seen) == self.fail_at:
            raise RuntimeError("pair statistic failed")
        both = fp.model is self.fp and q.model is self.q and fp.hidden.shape == q.hidden.shape
        self.seen.append((batch.example_ids.tolist(), threading.current_thread().name, both))


def test_pair_pass_streams_take_whole_batches_in_order(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, q = pair
    examples = _examples(n=9)
    expected = [batch.example_ids.tolist() for batch in iter_batches(examples, 2)]
    recorder, residuals = _PairRecorder(fp, q), ResidualStatistic("tiny", "q")
    run_pair_pass(fp, q, iter_batches(examples, 2), [recorder], q_statistics=[residuals], streams=2)
    assert [ids for ids, _, _ in recorder.seen] == expected
    assert {name.startswith("qbreak-stream") for _, name, _ in recorder.seen} == {True}
    assert all(both for _, _, both in recorder.seen)
    # an observer whose hooks keep no per-forward state gets one batch at a time, in the caller's thread
    recorder, threads = _PairRecorder(fp, q), _ThreadNames()
    run_pair_pass(fp, q, iter_batches(examples, 2), [recorder], fp_statistics=[threads], streams=2)
    assert [ids for ids, _, _ in recorder.seen] == expected
    assert threads.threads == {name for _, name, _ in recorder.seen} == {threading.current_thread().name}


def test_a_failing_pair_stream_raises_and_restores_the_threads(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None
) -> None:
    fp, q = pair
    recorder = _PairRecorder(fp, q, fail_at=2)
    with pytest.raises(RuntimeError, match="pair statistic failed"):
        run_pair_pass(fp, q, iter_batches(_examples(n=12), 2), [recorder], streams=2)
    assert len(recorder.seen) == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("streams", [1, 2])
def test_group_pass_equals_one_pass_per_model(
    pair: tuple[torch.nn.Module, torch.nn.Module], two_threads: None, streams: int
) -> None:
    """FP once per batch and two quantized models beside it: every table equals that of the FP pass
    and of one side-by-side pass per quantized model."""
    fp, q1 = pair
    q2 = perturbed_copy(fp, scale=0.2, seed=7)
    examples = _examples(n=9, max_len=25)

    def statistics(name: str, q: torch.nn.Module) -> tuple[CompareStatistic, ResidualStatistic, AmplificationStatistic]:
        return CompareStatistic("tiny", name, topk=8), ResidualStatistic("tiny", name), AmplificationStatistic("tiny", name, q)

    fp_nll, fp_residuals = NLLStatistic("tiny", "fp"), ResidualStatistic("tiny", "fp")
    run_pass(fp, iter_batches(examples, 2), [fp_nll, fp_residuals], streams=streams)
    expected = [fp_nll.result(), fp_residuals.result()]
    for name, q in (("q1", q1), ("q2", q2)):
        compare, residuals, amplification = statistics(name, q)
        run_pair_pass(
            fp, q, iter_batches(examples, 2), [compare], fp_statistics=[amplification], q_statistics=[residuals],
            streams=streams,
        )
        expected += [compare.nll_table(), compare.kl_table(), residuals.result(), amplification.result()]

    group_nll, group_residuals = NLLStatistic("tiny", "fp"), ResidualStatistic("tiny", "fp")
    per_q = [statistics("q1", q1), statistics("q2", q2)]
    shared_head = GroupCompareStatistic("tiny", ["q1", "q2"], topk=8)  # the FP head once for both
    run_group_pass(
        fp, [q1, q2], iter_batches(examples, 2), [[compare] for compare, _, _ in per_q],
        fp_statistics=[group_nll, group_residuals, *(amplification for _, _, amplification in per_q)],
        q_statistics=[[residuals] for _, residuals, _ in per_q], streams=streams, group_statistics=[shared_head],
    )
    got = [group_nll.result(), group_residuals.result()]
    for compare, residuals, amplification in per_q:
        got += [compare.nll_table(), compare.kl_table(), residuals.result(), amplification.result()]
    assert len(got) == len(expected) == 10
    for one, group in zip(expected, got, strict=True):
        assert group.equals(one)
    for i, name in enumerate(("q1", "q2")):
        assert shared_head.methods[name].nll_table().equals(expected[2 + 4 * i])
        assert shared_head.methods[name].kl_table().equals(expected[3 + 4 * i])
    assert got[2].column("nll").to_pylist() != got[6].column("nll").to_pylist()  # two different models
    assert torch.get_num_threads() == 2


def test_group_pass_refuses_mismatched_statistics(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    with pytest.raises(ValueError, match="2 quantized models need as many lists"):
        run_group_pass(fp, [q, q], iter_batches(_examples(n=2), 2), [[CompareStatistic("tiny", "q")]])
