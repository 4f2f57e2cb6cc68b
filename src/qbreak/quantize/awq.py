"""AWQ through llm-compressor: AWQModifier (activation-aware scales) then group-wise int quantization."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from qbreak.quantize.base import MethodConfig
from qbreak.quantize.oneshot import quantization_scheme, run_oneshot


class AWQ:
    """Options: n_grid (scale search points, default 20), duo_scaling (true | false | both)."""

    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    needs_calibration: ClassVar[bool] = True
    family: ClassVar[str] = "awq"

    def quantize(self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        assert calibration is not None
        recipe = [
            AWQModifier(
                n_grid=int(config.options.get("n_grid", 20)),
                duo_scaling=config.options.get("duo_scaling", True),
            ),
            QuantizationModifier(config_groups={"weights": quantization_scheme(config)}, ignore=["lm_head"]),
        ]
        return run_oneshot(model, calibration, recipe, config)
