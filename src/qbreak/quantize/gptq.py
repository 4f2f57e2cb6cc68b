"""GPTQ through llm-compressor's GPTQModifier (asymmetric int, group-wise, lm_head excluded)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qbreak.quantize.base import MethodConfig
from qbreak.quantize.oneshot import quantization_scheme, run_oneshot


class GPTQ:
    """Options: damping (dampening_frac, default 0.01), block_size (128), actorder (static | weight | null)."""

    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    needs_calibration: ClassVar[bool] = True
    family: ClassVar[str] = "gptq"

    def quantize(self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig) -> dict[str, Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier

        assert calibration is not None
        modifier = GPTQModifier(
            config_groups={"weights": quantization_scheme(config)},
            ignore=["lm_head"],
            dampening_frac=float(config.options.get("damping", 0.01)),
            block_size=int(config.options.get("block_size", 128)),
            actorder=config.options.get("actorder", "static"),
        )
        return run_oneshot(model, calibration, [modifier], config)
