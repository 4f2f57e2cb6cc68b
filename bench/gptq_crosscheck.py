"""qbreak's GPTQ (llm-compressor) at GPTQModel's settings: perplexity on the first N evaluation examples.

Pair with bench/gptq_crosscheck_gptqmodel.py (GPTQModel 7.6.0 in a scratch venv: it pins
numpy 2.2.6, which conflicts with qbreak's pins) and compare the two perplexities.
Settings: 3-bit, group 64, asymmetric, no activation ordering (GPTQModel desc_act=False),
damping 0.01, the first 64 calibration examples. Run from the repository root after `make run`:

    .venv/bin/python bench/gptq_crosscheck.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.nll import per_example_nll
from qbreak.quantize.run import quantize_model

CORPUS = Path("results/corpus/wikipedia-vital/smollm2-135m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m/fp")
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--actorder", default=None, help="null (default, = desc_act=False) or static")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    examples = read_table(CORPUS / "examples.arrow", EXAMPLES_SCHEMA).slice(0, args.n_eval)
    entry = {"kind": "gptq", "bits": 3, "group_size": 64, "damping": 0.01,
             "actorder": args.actorder, "calibration_samples": args.calibration_samples}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_model("gptq-crosscheck", entry, args.model, CORPUS / "calibration.arrow", Path(tmp) / "q")
        seconds = time.perf_counter() - start
        nll_q = per_example_nll(load_model(Path(tmp) / "q"), examples, "m", "gptq").column("nll").to_numpy()
    nll_fp = per_example_nll(load_model(args.model), examples, "m", "fp").column("nll").to_numpy()
    print(f"FP ppl {np.exp(nll_fp.mean()):.4f}")
    print(f"qbreak/llm-compressor GPTQ W3 g64 actorder={args.actorder} ppl {np.exp(nll_q.mean()):.4f} "
          f"({seconds:.0f} s quantization, {args.calibration_samples} calibration examples)")


if __name__ == "__main__":
    main()
