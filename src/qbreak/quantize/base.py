"""The one interface every quantization method implements, and what they share.

A method takes the FP model (and calibration token ids) and leaves the *same* model with dense
dequantized weights: what the quantized model computes, in float. Everything downstream (NLL,
residuals, patching) then runs it as a plain transformers model, whatever the method.
Only the Linear layers of the decoder blocks are quantized; embeddings and lm_head stay FP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from qbreak.config import check_group_size
from qbreak.errors import QbreakError


@dataclass(frozen=True)
class MethodConfig:
    """Config entry methods.<name>: kind, bits, group size and method options."""

    name: str
    kind: str
    bits: int
    group_size: int
    symmetric: bool = False
    seed: int = 0
    calibration_samples: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any]) -> MethodConfig:
        known = {"kind", "bits", "group_size", "symmetric", "seed", "calibration_samples"}
        return cls(
            name=name,
            kind=str(entry["kind"]),
            bits=int(entry["bits"]),
            group_size=int(entry["group_size"]),
            symmetric=bool(entry.get("symmetric", False)),
            seed=int(entry.get("seed", 0)),
            calibration_samples=int(entry.get("calibration_samples", 64)),
            options={k: v for k, v in entry.items() if k not in known},
        )


class Quantizer(Protocol):
    """A weight-only quantization method (see METHODS in qbreak.quantize)."""

    supported_bits: ClassVar[tuple[int, ...]]
    needs_calibration: ClassVar[bool]
    family: ClassVar[str]  # methods of one family share a mechanism (paper: GPTQ / AWQ / NF / QAT)

    def quantize(
        self, model: torch.nn.Module, calibration: torch.Tensor | None, config: MethodConfig
    ) -> dict[str, Any]:
        """Replace the decoder Linear weights of `model` in place by dequantized ones; return metadata.

        calibration: [samples, seq_len] int64 token ids, or None for data-free methods.
        """


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder blocks, by module name (no embeddings, no lm_head)."""
    layers = model.get_decoder().layers
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {
        f"{prefix}.{name}": module
        for name, module in layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@torch.inference_mode()
def replace_decoder_weights(model: torch.nn.Module, quantize: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Set every decoder Linear weight to quantize(weight) (dense, same shape); return how many."""
    linears = decoder_linears(model)
    for linear in linears.values():
        linear.weight.data = quantize(linear.weight.data)
    return len(linears)


def check_method(config: MethodConfig, quantizer: Quantizer, model: torch.nn.Module) -> None:
    """Bits supported by the method, and a group size that divides every quantized layer's width."""
    key = f"methods.{config.name}"
    if config.bits not in quantizer.supported_bits:
        raise QbreakError(
            f"config key {key}.bits: {config.kind} supports {list(quantizer.supported_bits)} bits, got {config.bits}"
        )
    for name, linear in decoder_linears(model).items():
        check_group_size(config.name, config.group_size, linear.in_features, f"of layer {name}")


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a [out, in] weight as [out, in // group_size, group_size] (groups along the input dim)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features, in_features // group_size, group_size)
