"""Per-example NLL: equals the model's own loss, independent of batch size, padding and chunking."""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from qbreak import passes
from qbreak.io import EXAMPLES_SCHEMA
from qbreak.nll import per_example_nll, token_nll
from tests.conftest import make_tiny_llama


def examples_table(rows: list[list[int]]) -> pa.Table:
    return pa.table(
        {
            "example_id": np.arange(len(rows), dtype=np.int32),
            "doc_id": [str(i) for i in range(len(rows))],
            "topic": [None] * len(rows),
            "input_ids": rows,
            "n_tokens": [len(r) for r in rows],
            "text": [""] * len(rows),
        },
        schema=EXAMPLES_SCHEMA,
    )


def random_rows(n: int, vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=lengths[i % len(lengths)]).tolist() for i in range(n)]


def own_loss(model: torch.nn.Module, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        return float(model(input_ids=x, labels=x).loss)


def test_nll_equals_model_loss_tiny(tiny_llama: torch.nn.Module) -> None:
    rows = random_rows(5, 512, [17, 40, 64])
    table = per_example_nll(tiny_llama, examples_table(rows), "tiny", "fp", batch_size=1)
    for row, nll in zip(rows, table.column("nll").to_pylist(), strict=True):
        assert nll == pytest.approx(own_loss(tiny_llama, row), abs=1e-5)
    assert table.column("n_scored").to_pylist() == [len(r) - 1 for r in rows]


@pytest.mark.slow
def test_nll_equals_model_loss_bundled(bundled_model: torch.nn.Module, bundled_tokenizer) -> None:
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = [0] + bundled_tokenizer(text, add_special_tokens=False)["input_ids"]
    table = per_example_nll(bundled_model, examples_table([ids]), "smollm2-135m", "fp", batch_size=1)
    nll = table.column("nll")[0].as_py()
    # HF averages in float32 over full-vocabulary logits; qbreak sums chunked float32 terms in float64.
    assert nll == pytest.approx(own_loss(bundled_model, ids), abs=1e-4)
    assert 0.5 < nll < 8  # a real language model on plain English text


def test_nll_independent_of_batch_size_and_padding(tiny_llama: torch.nn.Module) -> None:
    # Mixed lengths force right padding; each batch size pads differently.
    rows = random_rows(7, 512, [9, 33, 20, 64], seed=1)
    table = examples_table(rows)
    reference = per_example_nll(tiny_llama, table, "tiny", "fp", batch_size=1).column("nll").to_numpy()
    for batch_size in (2, 3, 7):
        other = per_example_nll(tiny_llama, table, "tiny", "fp", batch_size=batch_size).column("nll").to_numpy()
        np.testing.assert_allclose(other, reference, atol=1e-4, rtol=0)
    # Padding with a different pad id must not matter either (it is masked, never a target).
    from qbreak.nll import NLLStatistic
    from qbreak.passes import iter_batches, run_pass

    stat = NLLStatistic("tiny", "fp")
    run_pass(tiny_llama, iter_batches(table, 7, pad_id=511), [stat])
    np.testing.assert_allclose(stat.result().column("nll").to_numpy(), reference, atol=1e-4, rtol=0)


def test_chunked_nll_equals_full_log_softmax() -> None:
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16), torch.randn(101, 16), torch.randn(101)
    targets = torch.randint(0, 101, (37,))
    full = -torch.log_softmax(hidden @ weight.T + bias, dim=-1).gather(1, targets[:, None]).squeeze(1)
    for chunk in (1, 5, 37, 1000):
        torch.testing.assert_close(token_nll(hidden, weight, targets, bias, chunk), full, atol=1e-5, rtol=0)
    # The online log-sum-exp over vocabulary blocks: any block size, a last block shorter than the rest.
    for block in (1, 7, 50, 101, 4096):
        torch.testing.assert_close(token_nll(hidden, weight, targets, bias, 16, block), full, atol=1e-5, rtol=0)
    # Large logits (a peaked distribution) must not overflow the running sum.
    torch.testing.assert_close(
        token_nll(hidden * 40, weight, targets, bias, 16, 7),
        -torch.log_softmax(hidden * 40 @ weight.T + bias, dim=-1).gather(1, targets[:, None]).squeeze(1),
        atol=1e-3, rtol=1e-5,
    )


def test_head_sizes_by_device_and_the_pass_takes_given_ones(tiny_llama: torch.nn.Module) -> None:
    """Cache-sized head blocks on a CPU, large ones on a GPU (bench/gpu_passes.py); given sizes win,
    and every size yields the same NLLs."""
    from qbreak.nll import (
        DEFAULT_CHUNK_TOKENS, DEFAULT_VOCAB_BLOCK, GPU_CHUNK_TOKENS, GPU_VOCAB_BLOCK, NLLStatistic, head_sizes,
    )
    from qbreak.passes import iter_batches, run_pass

    assert head_sizes("cpu") == (DEFAULT_CHUNK_TOKENS, DEFAULT_VOCAB_BLOCK)
    assert head_sizes(torch.device("cuda", 1)) == (GPU_CHUNK_TOKENS, GPU_VOCAB_BLOCK)
    assert GPU_CHUNK_TOKENS * GPU_VOCAB_BLOCK > DEFAULT_CHUNK_TOKENS * DEFAULT_VOCAB_BLOCK
    assert head_sizes("cuda", 64) == (64, GPU_VOCAB_BLOCK)
    assert head_sizes("cpu", vocab_block=7) == (DEFAULT_CHUNK_TOKENS, 7)

    table = examples_table(random_rows(9, tiny_llama.config.vocab_size, [5, 12, 3, 20, 8, 16, 2, 11, 7], seed=4))
    nlls = []
    for sizes in ((None, None), (GPU_CHUNK_TOKENS, GPU_VOCAB_BLOCK), (5, 7)):
        statistic = NLLStatistic("tiny", "fp", *sizes)
        run_pass(tiny_llama, iter_batches(table, 4), [statistic], streams=1)
        nlls.append(statistic.result().column("nll").to_numpy())
    np.testing.assert_allclose(nlls[1], nlls[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(nlls[2], nlls[0], atol=1e-5, rtol=0)


def test_online_nll_of_low_precision_heads_reuses_a_float32_buffer() -> None:
    """bfloat16 states and head: logits computed in bfloat16, log-sum-exp in float32, as the full path."""
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(37, 16).bfloat16(), torch.randn(101, 16).bfloat16(), torch.randn(101).bfloat16()
    targets = torch.randint(0, 101, (37,))
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    full = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    for block in (7, 101):
        result = token_nll(hidden, weight, targets, bias, 16, block)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, full, atol=1e-5, rtol=0)


def test_fallback_path_for_transformed_logits_matches_model_loss() -> None:
    model = make_tiny_llama(seed=3)
    model.config.logit_scale = 0.5  # marks logits as transformed: NLL must come from model(...).logits
    from qbreak.nll import has_plain_lm_head

    assert not has_plain_lm_head(model)
    rows = random_rows(3, 512, [12, 30], seed=2)
    table = per_example_nll(model, examples_table(rows), "tiny", "fp", batch_size=2)
    for row, nll in zip(rows, table.column("nll").to_pylist(), strict=True):
        assert nll == pytest.approx(own_loss(model, row), abs=1e-5)


X86_64_GLIBC = platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"
FE_UPWARD = 0x800  # glibc on x86-64


def _nll_in_thread_rounding_upward(model: torch.nn.Module, table: pa.Table, streams: int) -> np.ndarray:
    """NLLs computed by a thread that rounds upward (and whose stream threads inherit that)."""
    libm = ctypes.CDLL("libm.so.6")
    result: list[np.ndarray] = []

    def run() -> None:
        libm.fesetround(FE_UPWARD)
        table_ = per_example_nll(model, table, "tiny", "fp", batch_size=2, streams=streams)
        result.append(table_.column("nll").to_numpy())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.skipif(not X86_64_GLIBC, reason="sets the rounding mode with glibc's x86-64 FE_UPWARD")
@pytest.mark.parametrize("streams", [1, 2])
def test_nll_pass_runs_in_the_default_float_environment(
    tiny_llama: torch.nn.Module, streams: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = examples_table(random_rows(4, 512, [9, 14]))
    reference = per_example_nll(tiny_llama, table, "tiny", "fp", batch_size=2, streams=streams).column("nll").to_numpy()
    with caplog.at_level(logging.WARNING, logger="qbreak.runtime"):
        guarded = _nll_in_thread_rounding_upward(tiny_llama, table, streams)
    np.testing.assert_array_equal(guarded, reference)
    assert "rounds upward" in caplog.text and "reset to IEEE defaults" in caplog.text
    # the guard is what makes them equal: without it the same thread's NLLs move
    monkeypatch.setattr(passes, "ensure_default_float_environment", lambda where: None)
    assert not np.array_equal(_nll_in_thread_rounding_upward(tiny_llama, table, streams), reference)
