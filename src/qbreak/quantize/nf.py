"""NormalFloat (NF3/NF4): a codebook of normal quantiles, scaled per group by the group's absmax."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qbreak.quantize.base import MethodConfig, grouped, replace_decoder_weights

# QLoRA's offset: the outermost quantile used, so that the codebook's extremes are ±1 after scaling.
NF_OFFSET = 0.9677083


def normal_float_codebook(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat values in [-1, 1], sorted, with an exact 0 (QLoRA's construction).

    2**(bits-1) positive quantiles, 2**(bits-1) - 1 negative ones and zero; for bits=4 this is
    bitsandbytes' NF4 table.
    """
    n_pos, n_neg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(NF_OFFSET, 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(NF_OFFSET, 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values / values.abs().max()
    return values.sort().values.float()


@torch.inference_mode()
def nf_quantize_tensor(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dequantized NormalFloat weight [out, in]: each group is codebook values × the group's absmax."""
    codebook = normal_float_codebook(bits).to(weight.device)
    w = grouped(weight.float(), group_size)  # [out, groups, group_size]
    absmax = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    normed = w / absmax
    # Nearest codebook value via the midpoints between neighbouring values.
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    index = torch.bucketize(normed.contiguous(), midpoints)
    return (codebook[index] * absmax).reshape(weight.shape).to(weight.dtype)


class NormalFloat:
    """NF3/NF4 with absmax scaling per group (the paper's NF family, group 64)."""

    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4)
    needs_calibration: ClassVar[bool] = False
    family: ClassVar[str] = "nf"

    def quantize(self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig) -> dict[str, Any]:
        n = replace_decoder_weights(model, lambda w: nf_quantize_tensor(w, config.bits, config.group_size))
        return {"layers_quantized": n, "codebook": normal_float_codebook(config.bits).tolist()}
