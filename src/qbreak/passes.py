"""One forward pass over the examples, feeding any number of per-example statistics.

A model pass batches the examples (right padding, attention mask), runs the decoder once per batch
and hands the final hidden state to every statistic registered for the pass. Statistics reduce per
batch (nothing of size examples × tokens × vocabulary is ever kept), so later stages (KL against FP
side by side, residual norms, logit lens) add themselves to the same pass instead of re-running
the model once per statistic.

On a CPU with two or more threads a pass runs as two *streams*: Python threads, each running torch
ops with half the threads (torch releases the GIL inside its ops). The small matmuls of a decoder
split poorly across threads, so two streams of one thread each do more per second than one stream
of two (README, Performance). A single-model pass gives each stream its own batches; the side-by-side
pass runs the FP and the quantized forward of a batch at once. Results equal the one-stream pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch

from qbreak.errors import QbreakError
from qbreak.hooks import decoder_layers
from qbreak.runtime import release_freed_memory


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
    """Final normed hidden state of a causal LM's decoder [batch, pos, d_model]."""
    decoder = model.get_decoder()
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


@dataclass(frozen=True)
class ModelState:
    """One model's view of a batch in a side-by-side pass."""

    model: torch.nn.Module
    hidden: torch.Tensor  # [batch, pos, d_model], final normed hidden state


class PairStatistic(Protocol):
    """A per-example statistic that compares the FP and a quantized model on the same batch."""

    def update(self, batch: Batch, fp: ModelState, q: ModelState) -> None:
        """Consume one batch, run through both models."""


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
    2-thread stream, with identical results (README, Performance, 2026-12-03). GPUs keep one stream.
    """
    device = next(model.parameters()).device
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def _stream_pool(streams: int) -> Iterator[ThreadPoolExecutor]:
    """`streams` worker threads whose torch ops use threads // streams intra-op threads each.

    torch's thread count is process-wide for MKL and per OS thread for OpenMP (a new thread takes
    the count set when it first runs an op), so it is lowered before the workers start and restored
    after they have stopped; the pool is fresh per pass.
    """
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // streams))
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="qbreak-stream") as pool:
            yield pool
    finally:
        torch.set_num_threads(total)


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _in_inference(fn: Callable[..., _Result]) -> Callable[..., _Result]:
    """`fn` under inference mode in whichever thread runs it (the mode is thread-local)."""

    def run(*args: object) -> _Result:
        with torch.inference_mode():
            return fn(*args)

    return run


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

    Only one batch of either model's activations exists at a time, so comparisons that need both
    full distributions (KL) never store logits for the corpus. `fp_statistics` / `q_statistics`
    observe one of the two models, as in `run_pass`. With 2 streams (`default_streams`) the two
    forwards of a batch run at once, each with half the threads (each model's hooks fire only in
    its own forward), and pair statistics can spread their work over both (`map_pair_streams`);
    `streams` above 2 counts as 2.
    """
    streams = default_streams(fp_model) if streams is None else streams
    with contextlib.ExitStack() as stack:
        _attached(fp_model, fp_statistics, stack)
        _attached(q_model, q_statistics, stack)
        if streams < 2:
            for batch in batches:
                fp_hidden = _forward(fp_model, batch, fp_statistics)
                _update_pair(statistics, batch, fp_model, fp_hidden, q_model, _forward(q_model, batch, q_statistics))
                del fp_hidden
            return
        handoffs = _Handoffs(limit=HANDOFF_LIMIT)
        for model in {id(fp_model): fp_model, id(q_model): q_model}.values():
            _after_each_layer(model, handoffs.after_layer, stack)
        pool = stack.enter_context(_stream_pool(2))  # stops (its forwards done) before the hooks go
        token = _PAIR_POOL.set(_PairStreams(pool, 2, handoffs))
        stack.callback(_PAIR_POOL.reset, token)
        forward = _in_inference(handoffs.forward_then_help)
        for batch in batches:
            handoffs.begin(streams=2)
            # The forwards run in this context, so that their hooks can hand work over (`in_background`).
            fp_running, q_running = (
                pool.submit(contextvars.copy_context().run, forward, _observed_forward, model, batch, observers)
                for model, observers in ((fp_model, fp_statistics), (q_model, q_statistics))
            )
            fp_hidden, q_hidden = fp_running.result(), q_running.result()
            del fp_running, q_running
            # Here, after both streams and the work their hooks handed over are done.
            for model, hidden, observers in ((fp_model, fp_hidden, fp_statistics), (q_model, q_hidden, q_statistics)):
                for statistic in observers:
                    statistic.update(model, batch, hidden)
            _update_pair(statistics, batch, fp_model, fp_hidden, q_model, q_hidden)
            del fp_hidden, q_hidden


# Handed-over work items that may wait at once in a two-stream side-by-side pass (`in_background`):
# each holds its inputs (AmplificationStatistic: two [batch, pos, d_model] activations).
HANDOFF_LIMIT = 2


def _after_each_layer(model: torch.nn.Module, fn: Callable[[], None], stack: contextlib.ExitStack) -> None:
    """Call `fn()` after each decoder layer of `model` for the rest of the pass (no decoder layers: never)."""
    try:
        layers = decoder_layers(model)
    except QbreakError:
        return
    for layer in layers:
        stack.callback(layer.register_forward_hook(lambda *_: fn()).remove)


class _Handoffs:
    """Work the hooks of one stream hand to the other (`in_background`), in a two-stream pass.

    During its forward a stream runs one waiting item of the *other* stream after each of its
    decoder layers; once its forward is done it runs any waiting item until every stream's forward
    is done and none waits. A new item is handed over only while the other stream keeps pace (its
    decoder layers done, less the items waiting for it, at least this stream's less one) and fewer
    than `limit` wait; otherwise the stream that made it runs it at once. So the streams finish
    their batch together (AmplificationStatistic hands over the quantized MLP on every FP MLP
    input, 0.6 of a forward made in the FP stream, while the quantized stream also carries the
    residual statistics' hooks), and the waiting inputs stay a few layers' worth: a plain queue,
    emptied once the quantized forward was done, held every layer's inputs (bench/
    memory_scaling.py: compare_to_fp's peak RSS 1.21x from 16 to 128 examples).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: deque[tuple[int, Future[Any], Callable[..., Any], tuple[object, ...]]] = deque()
        self._forwards = 0
        self._layers: dict[int, int] = {}  # thread → decoder layers done in this batch
        self._changed = threading.Condition()

    def begin(self, streams: int) -> None:
        """A batch starts: `streams` forwards are about to run."""
        with self._changed:
            self._forwards = streams
            self._layers = {}

    def submit(self, fn: Callable[..., _Result], args: tuple[object, ...]) -> Future[_Result]:
        """Hand `fn(*args)` over, or run it now (outside a forward, or see above); its Future."""
        future: Future[_Result] = Future()
        with self._changed:
            me = threading.get_ident()
            others = [done for thread, done in self._layers.items() if thread != me]
            keeps_pace = bool(others) and max(others) - len(self._waiting) >= self._layers.get(me, 0) - 1
            if self._forwards > 0 and keeps_pace and len(self._waiting) < self.limit:
                self._waiting.append((me, future, fn, args))
                self._changed.notify_all()
                return future
        _run_into(future, fn, args)
        return future

    def after_layer(self) -> None:
        """Count a decoder layer of this stream, then run the oldest waiting item another stream
        handed over, if there is one."""
        with self._changed:
            me = threading.get_ident()
            self._layers[me] = self._layers.get(me, 0) + 1
            item = next((item for item in self._waiting if item[0] != me), None)
            if item is None:
                return
            self._waiting.remove(item)
        _run_into(*item[1:])

    def forward_then_help(self, forward: Callable[..., _Result], *args: object) -> _Result:
        """`forward(*args)`, then run waiting items until all forwards are done and none waits."""
        try:
            return forward(*args)
        finally:
            with self._changed:
                self._forwards -= 1
                self._changed.notify_all()
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._waiting or self._forwards == 0)
                    if not self._waiting:
                        break
                    _, future, fn, fn_args = self._waiting.popleft()
                _run_into(future, fn, fn_args)


def _run_into(future: Future[_Result], fn: Callable[..., _Result], args: tuple[object, ...]) -> None:
    """Run `fn(*args)` under inference mode and settle `future` with its result or its error."""
    try:
        future.set_result(_in_inference(fn)(*args))
    except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
        future.set_exception(exc)


@dataclass(frozen=True)
class _PairStreams:
    pool: ThreadPoolExecutor
    streams: int
    handoffs: _Handoffs


# The running side-by-side pass's streams (pool, count, handed-over work), for its statistics.
_PAIR_POOL: contextvars.ContextVar[_PairStreams | None] = contextvars.ContextVar("pair_pool", default=None)


def pair_streams() -> int:
    """Streams of the side-by-side pass running now in this thread (1 outside one, or with one stream)."""
    running = _PAIR_POOL.get()
    return 1 if running is None else running.streams


def map_pair_streams(fn: Callable[[_Item], _Result], items: Sequence[_Item]) -> list[_Result]:
    """`fn` over `items`, spread over the streams of the running side-by-side pass (else in turn).

    For a pair statistic's independent pieces of work (CompareStatistic: its batch's positions in
    `pair_streams()` parts), so that its head runs on every core as the two forwards did.
    """
    running = _PAIR_POOL.get()
    if running is None or len(items) < 2:
        return [fn(item) for item in items]
    return list(running.pool.map(_in_inference(fn), items))


def in_background(fn: Callable[..., _Result], *args: object) -> Future[_Result]:
    """`fn(*args)` handed to the other stream of the running two-stream side-by-side pass (run by
    the handing stream itself when enough work already waits, see `_Handoffs`); elsewhere run now.
    Its Future (done, outside such a pass).

    For hooks whose work can wait until their statistic's `update` (AmplificationStatistic: the
    quantized MLP on the FP input): the quantized model's stream takes about half of it between
    its own layers, instead of the FP stream doing all of it.
    """
    running = _PAIR_POOL.get()
    if running is None:
        done: Future[_Result] = Future()
        done.set_result(fn(*args))
        return done
    return running.handoffs.submit(fn, args)


def _update_pair(
    statistics: Sequence[PairStatistic],
    batch: Batch,
    fp_model: torch.nn.Module,
    fp_hidden: torch.Tensor,
    q_model: torch.nn.Module,
    q_hidden: torch.Tensor,
) -> None:
    """Feed one batch of both models to the pair statistics, then return the freed heap."""
    fp, q = ModelState(fp_model, fp_hidden), ModelState(q_model, q_hidden)
    for statistic in statistics:
        statistic.update(batch, fp, q)
    del fp, q
    release_freed_memory()


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
        pool = stack.enter_context(_stream_pool(streams))
        _run_streams(model, batches, statistics, pool, streams)


def _run_streams(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    statistics: Sequence[Statistic],
    pool: ThreadPoolExecutor,
    streams: int,
) -> None:
    """Each stream takes a batch, runs the forward and the statistics' `reduce`, then, when its turn
    comes (batch order), their `add` or `update`; at most `streams` batches are in flight. A failed
    batch still passes its turn on, so the other streams finish and the error reaches the caller."""
    turns = _Turns()

    def work(index: int, batch: Batch) -> None:
        with torch.inference_mode():
            try:
                hidden = _observed_forward(model, batch, statistics)
                partials = [_reduce(statistic, model, batch, hidden) for statistic in statistics]
            except BaseException:
                with turns.wait(index):  # pass the turn on, so that the later batches finish
                    pass
                raise
            with turns.wait(index):
                for statistic, partial in zip(statistics, partials, strict=True):
                    if partial is None:
                        statistic.update(model, batch, hidden)
                    else:
                        statistic.add(batch, partial)  # type: ignore[attr-defined]

    in_flight: deque[Future[None]] = deque()
    for index, batch in enumerate(batches):
        if len(in_flight) == streams:
            in_flight.popleft().result()
            release_freed_memory()
        in_flight.append(pool.submit(work, index, batch))
    while in_flight:
        in_flight.popleft().result()
    release_freed_memory()


def _reduce(statistic: Statistic, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> object | None:
    """The statistic's partial result of a batch if it splits `update` (see Statistic), else None."""
    reduce = getattr(statistic, "reduce", None)
    return None if reduce is None else reduce(model, batch, hidden)


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
    """Per-example values of each layer (and site), gathered batch by batch into one long table."""

    def __init__(self) -> None:
        self._parts: list[dict[str, np.ndarray]] = []

    def add(self, example_ids: np.ndarray, layer: int, values: dict[str, np.ndarray], site: str | None = None) -> None:
        """Values [batch] of one layer (and site) for the examples `example_ids` [batch]."""
        n = len(example_ids)
        part = {"example_id": example_ids.astype(np.int32), "layer": np.full(n, layer, dtype=np.int32), **values}
        if site is not None:
            part["site"] = np.array([site] * n, dtype=object)
        self._parts.append(part)

    def table(self, model_name: str, method: str, schema: pa.Schema) -> pa.Table:
        """The rows in `schema`; model and method are constant columns."""
        if not self._parts:
            return schema.empty_table()
        n = sum(len(p["example_id"]) for p in self._parts)
        columns: dict[str, object] = {"model": [model_name] * n, "method": [method] * n}
        for field in schema:
            if field.name not in columns:
                columns[field.name] = np.concatenate([p[field.name] for p in self._parts])
        return pa.table({field.name: columns[field.name] for field in schema}, schema=schema)
