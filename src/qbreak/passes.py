"""One forward pass over the examples, feeding any number of per-example statistics.

A model pass batches the examples (right padding, attention mask), runs the decoder once per batch
and hands the final hidden state to every statistic registered for the pass. Statistics reduce per
batch (nothing of size examples × tokens × vocabulary is ever kept), so later stages (KL against FP
side by side, residual norms, logit lens) add themselves to the same pass instead of re-running
the model once per statistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch


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


@torch.inference_mode()
def run_pass(model: torch.nn.Module, batches: Iterator[Batch], statistics: Sequence[Statistic]) -> None:
    """Run `model` once per batch and feed every statistic."""
    for batch in batches:
        hidden = final_hidden_state(model, batch)
        for statistic in statistics:
            statistic.update(model, batch, hidden)
