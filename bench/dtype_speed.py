"""bfloat16 against float32 on this CPU, side by side in one run: matmul peaks, model-pass speed, and
whether the analysis would single out the same examples.

`runtime.dtype: bfloat16` is allowed on a CPU only where it has AMX bfloat16 units
(`runtime.cpu_has_amx_bf16`): there the matmuls run several times faster, elsewhere slower. This
bench measures what the switch buys and what it changes, on the same examples:
- the 2048² matmul peak in each dtype (as `nll_throughput.matmul_peak`: one matmul on all threads
  or one per thread at once, the larger);
- tokens/s of the NLL pass and of the side-by-side FP + RTN W3 pass (NLL, KL both ways), as the jobs
  run them (two 1-thread streams given two threads), best of `--repeats` round-robin runs;
- the numbers: per-example FP NLL in bfloat16 minus float32, and for the quantized model the
  per-example error (NLL_q − NLL_fp) and KL(P_fp‖P_q) in both dtypes: their Spearman rank
  correlation and the overlap of their top 10% (the examples D_large would take).

    .venv/bin/python bench/dtype_speed.py --threads 2 --n-examples 32 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nll_throughput import matmul_peak, model_arguments, rtn_copy, side_by_side  # noqa: E402

from qbreak.io import EXAMPLES_SCHEMA, read_table  # noqa: E402
from qbreak.models import load_model  # noqa: E402
from qbreak.nll import per_example_nll  # noqa: E402
from qbreak.runtime import configure, cpu_has_amx_bf16  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def top_overlap(x: np.ndarray, y: np.ndarray, fraction: float = 0.1) -> float:
    k = max(1, round(fraction * len(x)))
    return len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, n_examples=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds over the paths; best time used")
    args = parser.parse_args()
    configure(args.threads)

    fp32 = load_model(Path(args.model))
    q32 = rtn_copy(fp32)  # a real RTN W3 (group 64) model, dequantized to float32 as the workflow stores it
    # a job in bfloat16 loads both float32 folders with dtype=bfloat16: the same as casting them
    models = {
        torch.float32: (fp32, q32),
        torch.bfloat16: (load_model(Path(args.model), dtype=torch.bfloat16), copy.deepcopy(q32).to(torch.bfloat16)),
    }
    examples = read_table(args.examples, EXAMPLES_SCHEMA).slice(0, args.n_examples)
    n_tokens = sum(len(r) for r in examples.column("input_ids").to_pylist())
    b = args.batch_size

    paths: list[tuple[str, torch.dtype, Callable[[], object]]] = []
    for dtype, (fp, q) in models.items():
        per_example_nll(fp, examples.slice(0, b), "m", "fp", b)  # warm-up: first-call kernel setup
        paths.append(("NLL pass", dtype, lambda fp=fp: per_example_nll(fp, examples, "m", "fp", b)))
        paths.append(("FP + RTN W3 side by side", dtype, lambda fp=fp, q=q: side_by_side(fp, q, examples, b, True, False)))
    times: dict[tuple[str, torch.dtype], list[float]] = {(name, dtype): [] for name, dtype, _ in paths}
    results: dict[tuple[str, torch.dtype], object] = {}
    for _ in range(args.repeats):
        for name, dtype, fn in paths:
            start = time.perf_counter()
            results[name, dtype] = fn()
            times[name, dtype].append(time.perf_counter() - start)
    peaks = {dtype: matmul_peak(dtype=dtype) for dtype in DTYPES}

    print(f"threads {args.threads}, {args.n_examples} examples × {n_tokens // args.n_examples} tokens, batch {b}; "
          f"AMX bfloat16 units: {cpu_has_amx_bf16()}")
    print("2048² matmul peak: " + ", ".join(f"{str(d).split('.')[1]} {peaks[d] / 1e9:.0f} GFLOP/s" for d in DTYPES)
          + f" ({peaks[torch.bfloat16] / peaks[torch.float32]:.2f}x)")
    print(f"best of {args.repeats} round-robin runs (median beside it), tokens/s")
    print(f"{'path':<28}{'float32':>10}{'bfloat16':>10}{'ratio':>8}{'median ratio':>14}")
    for name in dict.fromkeys(name for name, _, _ in paths):
        best = {d: n_tokens / min(times[name, d]) for d in DTYPES}
        median = {d: n_tokens / float(np.median(times[name, d])) for d in DTYPES}
        print(f"{name:<28}{best[torch.float32]:>10.0f}{best[torch.bfloat16]:>10.0f}"
              f"{best[torch.bfloat16] / best[torch.float32]:>7.2f}x{median[torch.bfloat16] / median[torch.float32]:>13.2f}x")

    nll_fp = {d: results["NLL pass", d].column("nll").to_numpy() for d in DTYPES}
    compare = {d: results["FP + RTN W3 side by side", d] for d in DTYPES}
    error = {d: compare[d].nll_table().column("nll").to_numpy() - nll_fp[d] for d in DTYPES}
    kl = {d: compare[d].kl_table().column("kl_fp_q").to_numpy() for d in DTYPES}
    delta = nll_fp[torch.bfloat16] - nll_fp[torch.float32]
    print(f"FP NLL, bfloat16 − float32: mean |Δ| {np.abs(delta).mean():.4f}, max {np.abs(delta).max():.4f} nats "
          f"(mean NLL {nll_fp[torch.float32].mean():.3f})")
    for label, values in (("error NLL_q − NLL_fp", error), ("KL(P_fp‖P_q)", kl)):
        a, c = values[torch.float32], values[torch.bfloat16]
        print(f"RTN W3 {label}: mean {a.mean():.4f} (float32) vs {c.mean():.4f} (bfloat16); Spearman "
              f"{spearman(a, c):.3f}, top-10% overlap {top_overlap(a, c):.2f}, max |Δ| {np.abs(a - c).max():.4f}")


if __name__ == "__main__":
    main()
