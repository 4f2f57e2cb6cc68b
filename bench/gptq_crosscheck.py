"""qbreak's GPTQ (llm-compressor) at GPTQModel's settings: perplexity on the first N evaluation examples.

Pair with bench/gptq_crosscheck_gptqmodel.py (GPTQModel 7.6.0 in a scratch venv: it pins
numpy 2.2.6, which conflicts with qbreak's pins) and compare the two perplexities.
Settings: 3-bit, group 64, asymmetric, no activation ordering (GPTQModel desc_act=False),
damping 0.01, the first 64 calibration examples. Run from the repository root after `make run`:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/gptq_crosscheck.py --threads 1
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/gptq_crosscheck.py --threads 1 --per-linear

By default llm-compressor's sequential pipeline takes one decoder layer per subgraph: all seven
Hessians of a layer come from one pass with that layer still in full precision (the counterpart of
GPTQModel's true_sequential=False). --per-linear passes oneshot(sequential_targets=["re:.*_proj$"]):
one subgraph per Linear, each quantized before the next subgraph's inputs are computed, so o_proj's
Hessian sees quantized q/k/v and down_proj's sees quantized gate/up (GPTQModel's default
true_sequential=True). Group scales/zeros come from the original weights in both modes (GPTQModel
static_groups=True). qbreak.quantize is reused unchanged: the flag only wraps llmcompressor.oneshot.

Measured 2026-12-02 (first 64 evaluation / 64 calibration examples, FP 14.05, one thread): default
35.54 (README); --per-linear 35.67 (221 s quantization, 211 subgraphs) — not GPTQModel
--static-groups (true-sequential) 33.74, so per-Linear sequencing alone does not reproduce
GPTQModel's true-sequential gain.
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-linear", action="store_true",
                        help='oneshot(sequential_targets=["re:.*_proj$"]): one sequential subgraph per Linear '
                             "(true-sequential), instead of one per decoder layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sequential_targets = ["re:.*_proj$"] if args.per_linear else None
    if sequential_targets is not None:
        # qbreak.quantize.oneshot.run_oneshot imports `oneshot` from llmcompressor at call time:
        # wrap it there so the rest of qbreak's GPTQ path stays exactly the same.
        import llmcompressor

        llmcompressor.oneshot = functools.partial(llmcompressor.oneshot, sequential_targets=sequential_targets)
    print(f"settings: W3 g64 asym damping 0.01 actorder={args.actorder} "
          f"calibration_samples={args.calibration_samples} n_eval={args.n_eval} "
          f"sequential_targets={sequential_targets or 'default (decoder layer)'} threads={args.threads}", flush=True)

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
    mode = "per-linear" if args.per_linear else "per-layer"
    print(f"qbreak/llm-compressor GPTQ W3 g64 actorder={args.actorder} {mode} ppl {np.exp(nll_q.mean()):.4f} "
          f"({seconds:.0f} s quantization, {args.calibration_samples} calibration examples)")


if __name__ == "__main__":
    main()
