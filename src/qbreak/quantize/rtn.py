"""Round-to-nearest: group-wise min-max integer quantization (asymmetric by default)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qbreak.quantize.base import MethodConfig, grouped, replace_decoder_weights


@torch.inference_mode()
def rtn_quantize_tensor(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Dequantized round-to-nearest weight [out, in], same dtype; each group has ≤ 2**bits values."""
    w = grouped(weight.float(), group_size)  # [out, groups, group_size]
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(dim=-1, keepdim=True) / q_max).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale), -q_max - 1, q_max)
        return (q * scale).reshape(weight.shape).to(weight.dtype)
    q_max = 2**bits - 1
    w_min = w.amin(dim=-1, keepdim=True).clamp(max=0)
    w_max = w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((w_max - w_min) / q_max).clamp(min=1e-12)
    zero = torch.round(-w_min / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, q_max)
    return ((q - zero) * scale).reshape(weight.shape).to(weight.dtype)


class RTN:
    """Asymmetric (or symmetric) min-max round-to-nearest, per group along the input dimension."""

    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    needs_calibration: ClassVar[bool] = False
    family: ClassVar[str] = "rtn"

    def quantize(self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig) -> dict[str, Any]:
        n = replace_decoder_weights(
            model, lambda w: rtn_quantize_tensor(w, config.bits, config.group_size, config.symmetric)
        )
        return {"layers_quantized": n}
