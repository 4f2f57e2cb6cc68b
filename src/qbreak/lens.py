"""Logit lens and layer restoring: where in depth do broken inputs depart from FP, and does putting
late layers back in full precision repair them?

Logit lens: decode each layer's residual output r_l as softmax(U · final_norm(r_l)) and score the
next token; at the last layer this is the model's own NLL. Restoring: the quantized model with a set
of decoder layers (all their weights, norms included) copied back from the FP model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from qbreak.errors import QbreakError
from qbreak.hooks import decoder_layers, hooks
from qbreak.io import LENS_SCHEMA, RESTORE_SCHEMA
from qbreak.layers import check_layers, layer_range
from qbreak.nll import ScoredPositions, has_plain_lm_head, per_example_nll, token_nll
from qbreak.passes import Batch, LayerRows, PerForward, iter_batches, run_pass


@dataclass
class _LensForward:
    """One forward's scored positions and, per decoded layer, the per-example mean NLL."""

    positions: ScoredPositions
    nll: dict[int, torch.Tensor] = field(default_factory=dict)


class LogitLensStatistic:
    """Per example and layer: mean NLL of the next token decoded from that layer's output.

    Stream-safe: each forward's hooks fill their own `_LensForward`, consumed in batch order.
    """

    stream_safe = True

    def __init__(
        self, model_name: str, method: str, layers: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        self.model_name, self.method, self.chunk_tokens = model_name, method, chunk_tokens
        self.layers = None if layers is None else sorted(set(layers))
        self._forward: PerForward[_LensForward] = PerForward()
        self._rows = LayerRows()

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[None]:
        if not has_plain_lm_head(model):
            raise QbreakError(f"{type(model).__name__}: the logit lens needs logits = lm_head(final norm(h))")
        n_layers = len(decoder_layers(model))
        layers = list(range(n_layers)) if self.layers is None else self.layers
        check_layers(layers, n_layers, "residuals.lens_layers")
        norm = model.get_decoder().norm
        head = model.get_output_embeddings()
        fns = {(layer, "block_out"): self._decoder(layer, norm, head) for layer in layers}
        with hooks(model, fns):
            yield

    def begin(self, batch: Batch) -> None:
        self._forward.begin(batch, _LensForward(ScoredPositions.of(batch)))

    def _decoder(self, layer: int, norm: torch.nn.Module, head: torch.nn.Linear):  # noqa: ANN202 (a hook closure)
        def decode(x: torch.Tensor) -> None:
            forward = self._forward.current
            positions = forward.positions
            states = positions.states(norm(x))
            nll = token_nll(states, head.weight, positions.targets, head.bias, self.chunk_tokens)
            forward.nll[layer] = positions.per_example_sum(nll) / positions.mask.sum(dim=1).clamp_min(1)
            return None

        return decode

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        ids = batch.example_ids.cpu().numpy()
        for layer, nll in sorted(self._forward.finish(batch).nll.items()):
            self._rows.add(ids, layer, {"nll": nll.double().cpu().numpy()})

    def result(self) -> pa.Table:
        """One row per example and decoded layer (io.LENS_SCHEMA)."""
        return self._rows.table(self.model_name, self.method, LENS_SCHEMA)


def logit_lens(
    model: torch.nn.Module, examples: pa.Table, model_name: str, method: str,
    layers: Sequence[int] | None = None, batch_size: int = 8, device: str = "cpu",
) -> pa.Table:
    """Per-example logit-lens NLL at each of `layers` (all layers when None)."""
    statistic = LogitLensStatistic(model_name, method, layers)
    run_pass(model, iter_batches(examples, batch_size, device), [statistic])
    return statistic.result()


def with_restored_layers(q_model: torch.nn.Module, fp_model: torch.nn.Module, layers: Sequence[int]) -> torch.nn.Module:
    """A copy of `q_model` whose decoder `layers` carry the FP model's weights (norms included)."""
    hybrid = copy.deepcopy(q_model)
    fp_layers, hybrid_layers = decoder_layers(fp_model), decoder_layers(hybrid)
    for layer in layers:
        hybrid_layers[layer].load_state_dict(fp_layers[layer].state_dict())
    return hybrid


def parse_layer_ranges(ranges: Sequence[Sequence[int]] | None, n_layers: int, key: str) -> dict[str, list[int]]:
    """label → layers of inclusive [first, last] ranges (negative = from the end); None = the last quarter."""
    if not ranges:
        first = n_layers - max(1, n_layers // 4)
        ranges = [[first, n_layers - 1]]
    out: dict[str, list[int]] = {}
    for entry in ranges:
        first, last = layer_range(entry, n_layers, key)
        out[f"{first}-{last}"] = list(range(first, last + 1))
    return out


def restore_table(
    q_model: torch.nn.Module, fp_model: torch.nn.Module, examples: pa.Table, model_name: str, method: str,
    ranges: Mapping[str, Sequence[int]], batch_size: int = 8, device: str = "cpu",
) -> pa.Table:
    """Per example and restored range: the NLL of the quantized model with those layers in FP."""
    parts = []
    for label, layers in ranges.items():
        hybrid = with_restored_layers(q_model, fp_model, layers)
        nll = per_example_nll(hybrid, examples, model_name, method, batch_size, device)
        del hybrid
        n = nll.num_rows
        parts.append(
            pa.table(
                {
                    "example_id": nll.column("example_id"),
                    "model": [model_name] * n,
                    "method": [method] * n,
                    "restored": [label] * n,
                    "first_layer": pa.array([min(layers) if layers else None] * n, pa.int32()),
                    "last_layer": pa.array([max(layers) if layers else None] * n, pa.int32()),
                    "nll": nll.column("nll"),
                    "n_scored": nll.column("n_scored"),
                },
                schema=RESTORE_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else RESTORE_SCHEMA.empty_table()
