"""HQQ (half-quadratic quantization, the `hqq` package): calibration-free, zero/scale optimized."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qbreak.quantize.base import MethodConfig, replace_decoder_weights


class HQQ:
    """hqq's Quantizer with its zero-point optimizer, dequantized to dense float weights."""

    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    needs_calibration: ClassVar[bool] = False
    family: ClassVar[str] = "hqq"

    def quantize(self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig) -> dict[str, Any]:
        from hqq.core.quantize import Quantizer as HQQQuantizer

        def dequantized(weight: torch.Tensor) -> torch.Tensor:
            w_q, meta = HQQQuantizer.quantize(
                weight.float(),
                nbits=config.bits,
                group_size=config.group_size,
                optimize=bool(config.options.get("optimize", True)),
                axis=1,  # groups along the input dimension, like every other method here
                bitpack=False,
                compute_dtype=torch.float32,
                device=str(weight.device),
            )
            return HQQQuantizer.dequantize(w_q, meta).reshape(weight.shape).to(weight.dtype)

        return {"layers_quantized": replace_decoder_weights(model, dequantized)}
