"""One forward pass over the examples, feeding any number of per-example statistics.

A model pass batches the examples (right padding, attention mask), runs the decoder once per batch
and hands the final hidden state to every statistic registered for the pass. Statistics reduce per
batch (nothing of size examples × tokens × vocabulary is ever kept), so later stages (KL against FP
side by side, residual norms, logit lens) add themselves to the same pass instead of re-running
the model once per statistic.

On a CPU with two or more threads a pass runs as two *streams*: Python threads, each running torch
ops with half the threads (torch releases the GIL inside its ops). The small matmuls of a decoder
split poorly across threads, so two streams of one thread each do more per second than one stream
of two (bench/RESULTS.md). Each stream takes its own batches (in the side-by-side pass, through
all the models), and the statistics consume them in batch order. Results equal the one-stream pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch

from qbreak.columns import Columns
from qbreak.runtime import ensure_default_float_environment, release_freed_memory


@dataclass(frozen=True)
class Batch:
    """A right-padded batch of examples."""

    example_ids: torch.Tensor  # [batch] int64
    input_ids: torch.Tensor  # [batch, pos] int64, padded with pad_id
    attention_mask: torch.Tensor  # [batch, pos] int64, 1 on real tokens
    lengths: torch.Tensor  # [batch] int64


def iter_batches(
    examples: pa.Table, batch_size: int, device: str | torch.device = "cpu", pad_id: int = 0
) -> Iterator[Batch]:
    """Batches of `batch_size` examples in table order, right-padded to the batch's longest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    ids = np.array(examples.column("example_id").to_numpy(), dtype=np.int64)
    tokens = examples.column("input_ids").to_pylist()
    for start in range(0, len(tokens), batch_size):
        rows = tokens[start : start + batch_size]
        lengths = np.array([len(r) for r in rows])
        padded = np.full((len(rows), lengths.max()), pad_id, dtype=np.int64)
        mask = np.zeros_like(padded)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
            mask[i, : len(row)] = 1
        yield Batch(
            example_ids=torch.as_tensor(ids[start : start + batch_size], dtype=torch.int64, device=device),
            input_ids=torch.as_tensor(padded, device=device),
            attention_mask=torch.as_tensor(mask, device=device),
            lengths=torch.as_tensor(lengths, device=device),
        )


class Statistic(Protocol):
    """A per-example statistic computed from one model pass.

    A statistic may also split `update` into `reduce(model, batch, hidden)` (the batch's partial
    result, no state touched: streams run it for two batches at once) and `add(batch, partial)`
    (accumulation, called in batch order); `update` is then `add(batch, reduce(...))`.
    """

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        """Consume one batch; `hidden` is the final (normed) hidden state [batch, pos, d_model]."""

    def result(self) -> pa.Table:
        """The statistic's table, one row per example (or per example and layer)."""


def final_hidden_state(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Final normed hidden state of a causal LM's decoder [batch, pos, d_model], computed in IEEE's
    default floating-point environment (`runtime.ensure_default_float_environment`)."""
    ensure_default_float_environment("model forward")
    decoder = model.get_decoder()
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


@dataclass(frozen=True)
class ModelState:
    """One model's view of a batch in a side-by-side pass."""

    model: torch.nn.Module
    hidden: torch.Tensor  # [batch, pos, d_model], final normed hidden state


class PairStatistic(Protocol):
    """A per-example statistic that compares the FP and a quantized model on the same batch.

    As a Statistic, it may split `update` into `reduce(batch, fp, q)` (the batch's partial result,
    run in the stream) and `add(batch, partial)` (called in batch order).
    """

    def update(self, batch: Batch, fp: ModelState, q: ModelState) -> None:
        """Consume one batch, run through both models."""


class GroupStatistic(Protocol):
    """A per-example statistic that compares the FP model with every quantized model of a group pass
    on the same batch (e.g. one FP head for all their KLs). As a PairStatistic, it may split
    `update` into `reduce(batch, fp, qs)` and `add(batch, partial)`."""

    def update(self, batch: Batch, fp: ModelState, qs: Sequence[ModelState]) -> None:
        """Consume one batch, run through the FP model and every quantized model (in pass order)."""


def _attached(model: torch.nn.Module, statistics: Sequence[Statistic], stack: contextlib.ExitStack) -> None:
    """Enter the hook contexts of the statistics that observe the model from inside."""
    for statistic in statistics:
        attach = getattr(statistic, "attach", None)
        if attach is not None:
            stack.enter_context(attach(model))


def _forward(model: torch.nn.Module, batch: Batch, statistics: Sequence[Statistic]) -> torch.Tensor:
    hidden = _observed_forward(model, batch, statistics)
    for statistic in statistics:
        statistic.update(model, batch, hidden)
    return hidden


def _observed_forward(model: torch.nn.Module, batch: Batch, statistics: Sequence[Statistic]) -> torch.Tensor:
    """The final hidden state, after telling the statistics (`begin`) that their hooks see `batch`."""
    for statistic in statistics:
        begin = getattr(statistic, "begin", None)
        if begin is not None:
            begin(batch)
    return final_hidden_state(model, batch)


def default_streams(model: torch.nn.Module) -> int:
    """Concurrent streams for a pass of `model`: 2 on a CPU given ≥ 2 torch threads, else 1.

    Each of the two streams gets half the threads. On this project's 2-core machine, two 1-thread
    streams ran the NLL pass 1.13-1.16x and the compare job's pass 1.11-1.15x faster than one
    2-thread stream, with identical results (bench/RESULTS.md, 2026-12-03). GPUs keep one stream.
    """
    device = next(model.parameters()).device
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def stream_pool(streams: int) -> Iterator[ThreadPoolExecutor]:
    """`streams` worker threads whose torch ops use threads // streams intra-op threads each.

    torch's thread count is process-wide for MKL and per OS thread for OpenMP (a new thread takes
    the count set when it first runs an op), so it is lowered before the workers start and restored
    after they have stopped; the pool is fresh per pass. The calling thread is first reset to the
    default floating-point environment, which the workers inherit, and where the statistics' results
    are computed.
    """
    ensure_default_float_environment("model pass")
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // streams))
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="qbreak-stream") as pool:
            yield pool
    finally:
        torch.set_num_threads(total)


@torch.inference_mode()
def run_pair_pass(
    fp_model: torch.nn.Module,
    q_model: torch.nn.Module,
    batches: Iterator[Batch],
    statistics: Sequence[PairStatistic],
    fp_statistics: Sequence[Statistic] = (),
    q_statistics: Sequence[Statistic] = (),
    streams: int | None = None,
) -> None:
    """Run the FP and the quantized model side by side on each batch and feed every statistic.

    Only one batch of either model's activations exists at a time per stream, so comparisons that
    need both full distributions (KL) never store logits for the corpus. `fp_statistics` /
    `q_statistics` observe one of the two models, as in `run_pass`. This is `run_group_pass` with
    one quantized model.
    """
    run_group_pass(fp_model, [q_model], batches, [statistics], fp_statistics, [q_statistics], streams)


@torch.inference_mode()
def run_group_pass(
    fp_model: torch.nn.Module,
    q_models: Sequence[torch.nn.Module],
    batches: Iterator[Batch],
    statistics: Sequence[Sequence[PairStatistic]],
    fp_statistics: Sequence[Statistic] = (),
    q_statistics: Sequence[Sequence[Statistic]] | None = None,
    streams: int | None = None,
    group_statistics: Sequence[GroupStatistic] = (),
) -> None:
    """Run the FP model once per batch and every quantized model beside it; feed every statistic.

    `statistics[i]` compare the FP model with `q_models[i]` (`PairStatistic`), `group_statistics`
    with all of them at once (`GroupStatistic`), `q_statistics[i]` observe `q_models[i]` alone and
    `fp_statistics` the FP model, as in `run_pass`. The FP forward is shared: M methods cost one FP
    and M quantized forwards, where M side-by-side passes cost 2M.
    With 2 streams (`default_streams`) each stream takes its own batches through all the models
    and the statistics' `reduce` (the KL head), and the statistics consume the batches in order,
    as in `run_pass`; hooked observers must keep their state per forward (`stream_safe`), else the
    pass runs one batch at a time. `streams` above 2 counts as 2. Results equal one
    `run_pair_pass` per quantized model.
    """
    q_statistics = [() for _ in q_models] if q_statistics is None else q_statistics
    if not len(statistics) == len(q_statistics) == len(q_models):
        raise ValueError(
            f"{len(q_models)} quantized models need as many lists of pair statistics and of quantized-model "
            f"statistics, got {len(statistics)} and {len(q_statistics)}"
        )
    groups = list(zip(q_models, statistics, q_statistics, strict=True))
    streams = default_streams(fp_model) if streams is None else streams
    observers = [*fp_statistics, *(statistic for observing in q_statistics for statistic in observing)]
    with contextlib.ExitStack() as stack:
        _attached(fp_model, fp_statistics, stack)
        for q_model, _, observing in groups:
            _attached(q_model, observing, stack)
        if streams < 2 or any(_one_forward_at_a_time(statistic) for statistic in observers):
            for batch in batches:
                fp = ModelState(fp_model, _forward(fp_model, batch, fp_statistics))
                qs = []
                for q_model, _, observing in groups:
                    release_freed_memory()  # the previous model's activation buffers, as in `work` below
                    qs.append(ModelState(q_model, _forward(q_model, batch, observing)))
                for (_, pair, _), q in zip(groups, qs, strict=True):
                    for statistic in pair:
                        statistic.update(batch, fp, q)
                for group_statistic in group_statistics:
                    group_statistic.update(batch, fp, qs)
                del fp, qs
                release_freed_memory()
            return

        def work(batch: Batch) -> Callable[[], None]:
            fp = ModelState(fp_model, _observed_forward(fp_model, batch, fp_statistics))
            single = [(statistic, fp, _reduce(statistic, fp_model, batch, fp.hidden)) for statistic in fp_statistics]
            pair, qs = [], []
            for q_model, pair_statistics, observing in groups:
                # The previous model's activation buffers are free now: return their pages before the
                # next forward touches others (score_model job, FP + 2 methods: peak RSS 2.4-2.7 GB
                # instead of 2.9-3.3 GB at the same speed; bench/RESULTS.md).
                release_freed_memory()
                q = ModelState(q_model, _observed_forward(q_model, batch, observing))
                single += [(statistic, q, _reduce(statistic, q_model, batch, q.hidden)) for statistic in observing]
                pair += [(statistic, q, _reduce_pair(statistic, batch, fp, q)) for statistic in pair_statistics]
                qs.append(q)
            group = [(statistic, _reduce_pair(statistic, batch, fp, qs)) for statistic in group_statistics]

            def add() -> None:  # in batch order, in the same order as the one-stream pass
                for statistic, state, partial in single:
                    _add(statistic, state.model, batch, state.hidden, partial)
                for statistic, q, partial in pair:
                    _add_pair(statistic, batch, fp, q, partial)
                for statistic, partial in group:
                    _add_pair(statistic, batch, fp, qs, partial)

            return add

        _run_streams(batches, work, stack.enter_context(stream_pool(2)), 2)


def _reduce_pair(
    statistic: PairStatistic | GroupStatistic, batch: Batch, fp: ModelState, q: ModelState | Sequence[ModelState]
) -> object | None:
    """The pair (or group) statistic's partial result of a batch if it splits `update` (see
    PairStatistic; `q`: the quantized model's state, or all of them for a GroupStatistic), else None."""
    reduce = getattr(statistic, "reduce", None)
    return None if reduce is None else reduce(batch, fp, q)


def _add_pair(
    statistic: PairStatistic | GroupStatistic, batch: Batch, fp: ModelState, q: ModelState | Sequence[ModelState],
    partial: object | None,
) -> None:
    """Consume a batch of the models: `add` its partial result (from `_reduce_pair`), or `update` if it has none."""
    if partial is None:
        statistic.update(batch, fp, q)
    else:
        statistic.add(batch, partial)  # type: ignore[attr-defined]


_State = TypeVar("_State")


class PerForward(Generic[_State]):
    """What a hooked statistic gathers during one forward, kept apart per forward so that streams
    may run forwards at once.

    `begin(batch, state)`, called in the thread that then runs the forward (`begin` of the
    statistic), makes `state` that thread's `current`, which the statistic's hooks fill; `finish(batch)`
    hands the batch's state back in any thread (the side-by-side pass calls `update` in its own
    thread, after both forwards). A statistic built on it sets `stream_safe = True` (see run_pass).
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._open: dict[int, _State] = {}  # id(batch) → state, until `finish`

    def begin(self, batch: Batch, state: _State) -> None:
        self._local.state = state
        self._open[id(batch)] = state

    @property
    def current(self) -> _State:
        state: _State | None = getattr(self._local, "state", None)
        if state is None:
            raise AssertionError("begin(batch) must precede the forward, in the thread that runs it")
        return state

    def finish(self, batch: Batch) -> _State:
        return self._open.pop(id(batch))


def _one_forward_at_a_time(statistic: object) -> bool:
    """True for a statistic with hooks in the forward (`attach` / `begin`) whose hooks keep their
    state in the statistic itself, not per forward (`PerForward`, `stream_safe`)."""
    observes_inside = hasattr(statistic, "attach") or hasattr(statistic, "begin")
    return observes_inside and not getattr(statistic, "stream_safe", False)


@torch.inference_mode()
def run_pass(
    model: torch.nn.Module, batches: Iterator[Batch], statistics: Sequence[Statistic], streams: int | None = None
) -> None:
    """Run `model` once per batch and feed every statistic.

    A statistic may also define `attach(model)` (a context manager that registers its hooks for the
    whole pass, see hooks.py) and `begin(batch)` (called before each forward, in the thread that
    runs it). The batches go to `streams` (`default_streams`) concurrent streams, and the
    statistics still consume them one at a time, in order; a statistic with hooks allows that only
    if it keeps its per-forward state apart (`PerForward`, `stream_safe = True`), else the pass
    runs one forward at a time.
    """
    streams = default_streams(model) if streams is None else streams
    with contextlib.ExitStack() as stack:
        _attached(model, statistics, stack)
        if streams < 2 or any(_one_forward_at_a_time(statistic) for statistic in statistics):
            for batch in batches:
                _forward(model, batch, statistics)
                release_freed_memory()
            return

        def work(batch: Batch) -> Callable[[], None]:
            hidden = _observed_forward(model, batch, statistics)
            partials = [_reduce(statistic, model, batch, hidden) for statistic in statistics]

            def add() -> None:
                for statistic, partial in zip(statistics, partials, strict=True):
                    _add(statistic, model, batch, hidden, partial)

            return add

        _run_streams(batches, work, stack.enter_context(stream_pool(streams)), streams)


def _run_streams(
    batches: Iterator[Batch], work: Callable[[Batch], Callable[[], None]], pool: ThreadPoolExecutor, streams: int
) -> None:
    """Each stream takes a batch and runs `work(batch)` (the forwards and the statistics' `reduce`),
    then, when its turn comes (batch order), the function `work` returned (their `add` or `update`);
    at most `streams` batches are in flight. A failed batch still passes its turn on, so the other
    streams finish and the error reaches the caller."""
    turns = _Turns()

    def run(index: int, batch: Batch) -> None:
        with torch.inference_mode():
            try:
                add = work(batch)
            except BaseException:
                with turns.wait(index):  # pass the turn on, so that the later batches finish
                    pass
                raise
            with turns.wait(index):
                add()

    in_flight: deque[Future[None]] = deque()
    for index, batch in enumerate(batches):
        if len(in_flight) == streams:
            in_flight.popleft().result()
            release_freed_memory()
        in_flight.append(pool.submit(run, index, batch))
    while in_flight:
        in_flight.popleft().result()
    release_freed_memory()


def _reduce(statistic: Statistic, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> object | None:
    """The statistic's partial result of a batch if it splits `update` (see Statistic), else None."""
    reduce = getattr(statistic, "reduce", None)
    return None if reduce is None else reduce(model, batch, hidden)


def _add(statistic: Statistic, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor, partial: object | None) -> None:
    """Consume a batch: `add` its partial result (from `_reduce`), or `update` if it has none."""
    if partial is None:
        statistic.update(model, batch, hidden)
    else:
        statistic.add(batch, partial)  # type: ignore[attr-defined]


class _Turns:
    """Lets the statistics consume batch i only after batch i − 1 (they accumulate in table order)."""

    def __init__(self) -> None:
        self._next = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def wait(self, index: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._next == index)
        try:
            yield
        finally:
            with self._changed:
                self._next += 1
                self._changed.notify_all()


class LayerRows:
    """Per-example values of each layer (and site), gathered batch by batch into one long table
    (in `Columns`: a few large arrays, not one small array per batch, layer and value)."""

    def __init__(self) -> None:
        self._columns = Columns(example_id=np.int32, layer=np.int32, site=object)

    def add(self, example_ids: np.ndarray, layer: int, values: dict[str, np.ndarray], site: str | None = None) -> None:
        """Values [batch] of one layer (and site) for the examples `example_ids` [batch]."""
        row: dict[str, object] = {"example_id": example_ids, "layer": layer, **values}
        if site is not None:
            row["site"] = site
        self._columns.append(len(example_ids), row)

    def table(self, model_name: str, method: str, schema: pa.Schema) -> pa.Table:
        """The rows in `schema`; model and method are constant columns."""
        n = len(self._columns)
        if n == 0:
            return schema.empty_table()
        columns: dict[str, object] = {"model": [model_name] * n, "method": [method] * n}
        for field in schema:
            if field.name not in columns:
                columns[field.name] = self._columns[field.name]
        return pa.table({field.name: columns[field.name] for field in schema}, schema=schema)
