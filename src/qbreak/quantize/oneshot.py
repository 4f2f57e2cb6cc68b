"""Shared llm-compressor plumbing for GPTQ and AWQ: run `oneshot`, keep dense dequantized weights.

llm-compressor attaches weight_scale / weight_zero_point to every quantized Linear and fake-quantizes
in forward. qbreak keeps what that model computes as plain dense weights: each quantized Linear's
weight goes through compressed_tensors' `fake_quantize` (idempotent for GPTQ, which already writes
grid values), every other tensor that changed (AWQ rescales RMSNorm weights) is carried over, and
the result is loaded into the original model, which calibration never touched (it ran on a deep
copy), so no hooks or extra parameters remain.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from qbreak.quantize.base import MethodConfig, decoder_linears


def quantization_scheme(config: MethodConfig) -> Any:
    """compressed-tensors scheme: int weights, group-wise along the input dim, no activation quant."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=config.bits,
        type="int",
        symmetric=config.symmetric,
        strategy="group",
        group_size=config.group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def calibration_loader(calibration: torch.Tensor) -> torch.utils.data.DataLoader:
    """One calibration example per batch, in the calibration split's (seeded) order."""
    rows = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calibration]
    return torch.utils.data.DataLoader(rows, batch_size=None, shuffle=False)


def disable_pinned_memory() -> None:
    """llm-compressor's IntermediatesCache pins CPU tensors, which fails without CUDA: make it a no-op."""
    from llmcompressor.pipelines import cache

    def no_pin(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    cache.IntermediatesCache.pin_memory = no_pin


def run_oneshot(
    model: torch.nn.Module, calibration: torch.Tensor, recipe: list[Any], config: MethodConfig
) -> dict[str, Any]:
    """Calibrate with llm-compressor on a copy of `model`; write dense dequantized weights into `model`."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot

    from qbreak.models import load_tokenizer

    # oneshot insists on a processor when given data, though pre-tokenized batches never use it.
    processor = load_tokenizer(model.name_or_path)
    if not torch.cuda.is_available():
        disable_pinned_memory()
    torch.manual_seed(config.seed)
    work = copy.deepcopy(model)
    oneshot(
        model=work,
        dataset=calibration_loader(calibration),
        recipe=recipe,
        processor=processor,
        num_calibration_samples=int(calibration.shape[0]),
        max_seq_length=int(calibration.shape[1]),
        shuffle_calibration_samples=False,
    )
    dense = {}
    with torch.inference_mode():
        for name, linear in decoder_linears(work).items():
            scheme = linear.quantization_scheme
            dense[f"{name}.weight"] = fake_quantize(
                linear.weight, linear.weight_scale, linear.weight_zero_point, scheme.weights
            )
        calibrated = work.state_dict()
        state = {key: dense.get(key, calibrated[key]) for key in model.state_dict()}
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    model.load_state_dict(state, strict=True)
    return {"layers_quantized": len(dense), "tensors_changed": len(changed)}
