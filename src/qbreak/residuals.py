"""Per-example, per-layer residual-stream statistics, reduced inside the hooks of one model pass.

For every decoder layer and site (pre_norm = the residual r^(l) after the attention add, post_norm
= its RMSNorm output, block_out = the layer's output) an example gets the mean over its tokens of
the L2 norm and of the kurtosis of the activation vector, E[(a − ā)⁴] / E[(a − ā)²]² over the
d_model entries (3 for a Gaussian vector; large when a few dimensions dominate). Position 0 (the
start token, identical in every example) is left out, as in the NLL. Nothing of size
examples × tokens × d_model is kept: memory is O(examples × layers × sites).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from qbreak.hooks import decoder_layers, hooks
from qbreak.io import AMPLIFICATION_SCHEMA, DIMS_SCHEMA, RESIDUALS_SCHEMA
from qbreak.passes import Batch, LayerRows, PerForward

RESIDUAL_SITES = ("pre_norm", "post_norm", "block_out")


@torch.inference_mode()
def token_norm_kurtosis(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean token L2 norm and mean token kurtosis (float64 [batch]) over `mask` [batch, pos]."""
    x = x.float()
    norms = x.norm(dim=-1)  # [batch, pos]
    # squared in place twice: torch's pow(4) is a general power, 13x slower than two squares on a CPU;
    # with it these statistics took 4% of the score_fp job's pass (bench/nll_throughput.py)
    squared = (x - x.mean(dim=-1, keepdim=True)).square_()
    m2 = squared.mean(dim=-1)
    kurtosis = squared.square_().mean(dim=-1) / m2.square().clamp_min(torch.finfo(torch.float32).tiny)
    weights = mask.to(torch.float64)
    count = weights.sum(dim=1).clamp_min(1.0)
    return (norms.double() * weights).sum(dim=1) / count, (kurtosis.double() * weights).sum(dim=1) / count


def statistic_mask(batch: Batch) -> torch.Tensor:
    """[batch, pos] bool: the real tokens of each example except position 0."""
    mask = batch.attention_mask.bool().clone()
    mask[:, 0] = False
    return mask


@dataclass
class _ResidualForward:
    """What the hooks of one forward gather: per (layer, site) the per-example norm and kurtosis,
    per layer the summed |r^(l)| over the batch's counted tokens."""

    mask: torch.Tensor
    values: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    abs_sums: dict[int, torch.Tensor] = field(default_factory=dict)


class ResidualStatistic:
    """Norms and kurtosis per example, layer and site, plus per-dimension mean |r^(l)| per layer.

    Stream-safe: each forward's hooks fill their own `_ResidualForward`, consumed in batch order.
    """

    stream_safe = True

    def __init__(self, model_name: str, method: str, sites: Sequence[str] = RESIDUAL_SITES) -> None:
        self.model_name, self.method, self.sites = model_name, method, tuple(sites)
        self._forward: PerForward[_ResidualForward] = PerForward()
        self._rows = LayerRows()
        self._abs_sum: dict[int, torch.Tensor] = {}
        self._tokens = 0.0

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[None]:
        """Observe `model` (FP or quantized) for the duration of the context."""
        n_layers = len(decoder_layers(model))
        fns = {(layer, site): self._observer(layer, site) for layer in range(n_layers) for site in self.sites}
        with hooks(model, fns):
            yield

    def begin(self, batch: Batch) -> None:
        self._forward.begin(batch, _ResidualForward(statistic_mask(batch)))

    def _observer(self, layer: int, site: str):  # noqa: ANN202 (a hook closure)
        def observe(x: torch.Tensor) -> None:
            forward = self._forward.current
            forward.values[(layer, site)] = token_norm_kurtosis(x, forward.mask)
            if site == "pre_norm":
                weights = forward.mask.to(x.dtype)[..., None]
                forward.abs_sums[layer] = (x.abs() * weights).sum(dim=(0, 1)).double()
            return None

        return observe

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        forward = self._forward.finish(batch)
        ids = batch.example_ids.cpu().numpy()
        for (layer, site), (norm, kurtosis) in sorted(forward.values.items()):
            self._rows.add(ids, layer, {"norm": norm.cpu().numpy(), "kurtosis": kurtosis.cpu().numpy()}, site)
        for layer, total in forward.abs_sums.items():  # in batch order: the sums do not depend on the streams
            if layer in self._abs_sum:
                self._abs_sum[layer] += total  # in place: no new long-lived tensor per batch (see columns.py)
            else:
                self._abs_sum[layer] = total
        self._tokens += float(forward.mask.sum())

    def result(self) -> pa.Table:
        """Long table: one row per example, layer and site (io.RESIDUALS_SCHEMA)."""
        return self._rows.table(self.model_name, self.method, RESIDUALS_SCHEMA)

    def mean_abs_per_dim(self) -> dict[int, np.ndarray]:
        """layer → mean |r^(l)| per residual dimension [d_model] over every counted token."""
        return {layer: (total / max(self._tokens, 1.0)).cpu().numpy() for layer, total in self._abs_sum.items()}


@dataclass
class _AmplificationForward:
    """What the hooks of one FP forward gather: each layer's FP residual before the MLP's RMSNorm
    until the MLP's output comes, then the layer's per-example (mse, power)."""

    mask: torch.Tensor
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class AmplificationStatistic:
    """Attached to the FP model: each layer's quantized MLP block applied to the FP residual, vs FP's.

    The block is the MLP with the RMSNorm before it (post_attention_layernorm), both the quantized
    model's: methods that fold scales into the model (AWQ divides that norm's γ by s and multiplies
    gate/up's input columns by s) keep the block's function but not the MLP's input basis, so the
    quantized MLP alone on the FP MLP input would measure the fold, not the quantization. For the
    other methods the norm is FP's and this is the quantized MLP on the FP MLP input.

    Per example and layer: the mean over tokens of the mean squared difference between the two
    blocks' outputs (same residual, so it isolates what the quantized weights do to it) and the
    mean squared FP MLP output (for a relative error). The paper links the first to the post-norm
    magnitude. Stream-safe: each forward's hooks fill their own `_AmplificationForward`.
    """

    stream_safe = True

    def __init__(self, model_name: str, method: str, q_model: torch.nn.Module) -> None:
        self.model_name, self.method = model_name, method
        self.q_layers = decoder_layers(q_model)
        self._forward: PerForward[_AmplificationForward] = PerForward()
        self._rows = LayerRows()

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[None]:
        n_layers = len(decoder_layers(model))
        if n_layers != len(self.q_layers):
            raise ValueError(f"FP model has {n_layers} layers, the quantized one {len(self.q_layers)}")
        fns = {}
        for layer in range(n_layers):
            fns[(layer, "pre_norm")] = self._keep_input(layer)
            fns[(layer, "down")] = self._compare_output(layer)
        with hooks(model, fns):
            yield

    def begin(self, batch: Batch) -> None:
        self._forward.begin(batch, _AmplificationForward(statistic_mask(batch)))

    def _keep_input(self, layer: int):  # noqa: ANN202 (a hook closure)
        def keep(x: torch.Tensor) -> None:
            self._forward.current.inputs[layer] = x
            return None

        return keep

    def _compare_output(self, layer: int):  # noqa: ANN202 (a hook closure)
        def compare(y_fp: torch.Tensor) -> None:
            forward = self._forward.current
            if layer not in forward.inputs:  # our own call of the quantized MLP, when it is hooked too
                return None
            forward.values[layer] = self._compare_mlps(layer, forward.inputs.pop(layer), y_fp, forward.mask)
            return None

        return compare

    @torch.inference_mode()
    def _compare_mlps(
        self, layer: int, r_fp: torch.Tensor, y_fp: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example mean squared (quantized MLP(norm(r_fp)) − y_fp) and mean squared y_fp, float64 [batch]."""
        q_layer = self.q_layers[layer]
        # .forward: the quantized model's own pre_norm / post_norm hooks (its residual statistics)
        # must not see this FP residual
        y_q = q_layer.mlp(q_layer.post_attention_layernorm.forward(r_fp))
        weights = mask.to(torch.float64)
        count = weights.sum(dim=1).clamp_min(1.0)
        mse = (y_q.float() - y_fp.float()).pow(2).mean(dim=-1).double()
        power = y_fp.float().pow(2).mean(dim=-1).double()
        return (mse * weights).sum(dim=1) / count, (power * weights).sum(dim=1) / count

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        ids = batch.example_ids.cpu().numpy()
        for layer, (mse, power) in sorted(self._forward.finish(batch).values.items()):
            self._rows.add(ids, layer, {"mlp_mse": mse.cpu().numpy(), "mlp_power": power.cpu().numpy()})

    def result(self) -> pa.Table:
        """One row per example and layer (io.AMPLIFICATION_SCHEMA)."""
        return self._rows.table(self.model_name, self.method, AMPLIFICATION_SCHEMA)


def norm_weights(model: torch.nn.Module) -> dict[int, np.ndarray]:
    """layer → the RMSNorm γ applied to the residual before the MLP (post_attention_layernorm.weight)."""
    return {
        index: layer.post_attention_layernorm.weight.detach().float().cpu().numpy()
        for index, layer in enumerate(decoder_layers(model))
    }


def dims_table(model_name: str, mean_abs: dict[int, np.ndarray], gamma: dict[int, np.ndarray]) -> pa.Table:
    """Per layer and residual dimension: mean |r^(l)| and the RMSNorm γ (io.DIMS_SCHEMA)."""
    layers = sorted(mean_abs)
    d = len(mean_abs[layers[0]]) if layers else 0
    return pa.table(
        {
            "model": [model_name] * (len(layers) * d),
            "layer": np.repeat(np.array(layers, dtype=np.int32), d),
            "dim": np.tile(np.arange(d, dtype=np.int32), len(layers)),
            "mean_abs": np.concatenate([mean_abs[layer] for layer in layers]) if layers else np.zeros(0),
            "gamma": np.concatenate([gamma[layer] for layer in layers]) if layers else np.zeros(0),
        },
        schema=DIMS_SCHEMA,
    )
