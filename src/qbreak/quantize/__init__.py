"""Weight-only quantization methods behind one interface (see base.Quantizer).

METHODS maps a config `kind` to its implementation; every method returns the same HF model with
dense dequantized weights.
"""

from __future__ import annotations

from qbreak.quantize.awq import AWQ
from qbreak.quantize.base import MethodConfig, Quantizer, check_method, decoder_linears
from qbreak.quantize.gptq import GPTQ
from qbreak.quantize.hqq import HQQ
from qbreak.quantize.nf import NormalFloat
from qbreak.quantize.rtn import RTN

METHODS: dict[str, type[Quantizer]] = {"rtn": RTN, "nf": NormalFloat, "gptq": GPTQ, "awq": AWQ, "hqq": HQQ}

__all__ = ["METHODS", "MethodConfig", "Quantizer", "check_method", "decoder_linears"]
