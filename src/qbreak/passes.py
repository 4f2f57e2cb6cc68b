"""One forward pass over the examples, feeding any number of per-example statistics.

A model pass batches the examples (right padding, attention mask), runs the decoder once per batch
and hands the final hidden state to every statistic registered for the pass. Statistics reduce per
batch (nothing of size examples × tokens × vocabulary is ever kept), so later stages (KL against FP
side by side, residual norms, logit lens) add themselves to the same pass instead of re-running
the model once per statistic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

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
    """A per-example statistic computed from one model pass."""

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
    for statistic in statistics:
        begin = getattr(statistic, "begin", None)
        if begin is not None:
            begin(batch)
    hidden = final_hidden_state(model, batch)
    for statistic in statistics:
        statistic.update(model, batch, hidden)
    return hidden


@torch.inference_mode()
def run_pair_pass(
    fp_model: torch.nn.Module,
    q_model: torch.nn.Module,
    batches: Iterator[Batch],
    statistics: Sequence[PairStatistic],
    fp_statistics: Sequence[Statistic] = (),
    q_statistics: Sequence[Statistic] = (),
) -> None:
    """Run the FP and the quantized model side by side on each batch and feed every statistic.

    Only one batch of either model's activations exists at a time, so comparisons that need both
    full distributions (KL) never store logits for the corpus. `fp_statistics` / `q_statistics`
    observe one of the two models, as in `run_pass`.
    """
    with contextlib.ExitStack() as stack:
        _attached(fp_model, fp_statistics, stack)
        _attached(q_model, q_statistics, stack)
        for batch in batches:
            fp = ModelState(fp_model, _forward(fp_model, batch, fp_statistics))
            q = ModelState(q_model, _forward(q_model, batch, q_statistics))
            for statistic in statistics:
                statistic.update(batch, fp, q)
            del fp, q
            release_freed_memory()


@torch.inference_mode()
def run_pass(model: torch.nn.Module, batches: Iterator[Batch], statistics: Sequence[Statistic]) -> None:
    """Run `model` once per batch and feed every statistic.

    A statistic may also define `attach(model)` (a context manager that registers its hooks for the
    whole pass, see hooks.py) and `begin(batch)` (called before each forward).
    """
    with contextlib.ExitStack() as stack:
        _attached(model, statistics, stack)
        for batch in batches:
            _forward(model, batch, statistics)
            release_freed_memory()


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
