"""qbreak vs lm-eval-harness on the same model and examples, side by side in one run.

1. One NLL pass: tokens/s of qbreak's per-example NLL vs lm-eval's `loglikelihood_rolling` (HFLM,
   prefix_token_id = qbreak's start token, so both score every document token given the start
   token); the per-example NLLs must agree to ≤ 1e-4. Beside them, the pass's matrix products alone
   (`nll_throughput.matmul_ceiling`): lm-eval's time over that is the most any implementation that
   keeps these matmuls could gain over lm-eval on this machine. With ≥ 2 threads qbreak's pass runs
   as two 1-thread streams (its default); lm-eval splits each op over the threads, as it does when
   given them. Its one-stream time and the matmuls as two streams are printed too.
2. The whole analysis of FP + M methods (NLL, KL both ways, residual norms and kurtosis, MLP
   amplification): qbreak's fused pass (the default `passes.fuse_methods: true`: the FP model once
   per batch and every method beside it, rule `score_model`) vs the same statistics one stage at a
   time, as a user of lm-eval plus hook scripts would run them: lm-eval NLL per model, a
   residual-statistics pass per model, an FP + quantized KL pass per method, an amplification pass
   per method. qbreak's per-method layout (`fuse_methods: false`: `score_fp` + one side-by-side
   `compare_to_fp` per method) is timed too. Printed: forward passes, seconds and matmul FLOPs of
   each, and their ratios. The staged residual and amplification passes stop before the head, so
   the per-method layout's FLOP ratio is ≈ 0.51 for any M; the fused pass runs the FP decoder once
   and the FP head twice (its NLL, and every method's KL at once): ≈ 0.36 for M = 2. The logit lens runs on D_large ∪ D_ctrl only in qbreak (a separate, smaller stage) and
   is left out of all sides.

Quantized models are RTN W3 / W4 built in-process (a real quantization; which method does not
matter for speed). Bundled SmolLM2 (Q4_1 reference weights).

    .venv/bin/python bench/vs_lm_eval.py --threads 2 --n-examples 32 --methods 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_adapter import lm_eval_nll  # noqa: E402
from nll_throughput import (  # noqa: E402
    forward_params,
    fp_job,
    fused_job,
    matmul_ceiling,
    matmul_ceiling_streams,
    mlp_params,
    model_arguments,
    rtn_copy,
    side_by_side,
)

from qbreak.io import EXAMPLES_SCHEMA, read_table  # noqa: E402
from qbreak.models import load_model, load_tokenizer  # noqa: E402
from qbreak.nll import per_example_nll  # noqa: E402
from qbreak.passes import iter_batches, run_pass  # noqa: E402
from qbreak.residuals import AmplificationStatistic, ResidualStatistic  # noqa: E402
from qbreak.runtime import configure  # noqa: E402


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def fused_analysis(fp, quantized, examples, batch_size: int) -> tuple[int, float]:  # noqa: ANN001
    """qbreak's default layout (rule score_model): the FP model once per batch (NLL + residuals),
    every method beside it (KL, its NLL and residuals, amplification)."""
    start = time.perf_counter()
    fused_job(fp, quantized, examples, batch_size)
    return 1 + len(quantized), time.perf_counter() - start


def per_method_analysis(fp, quantized, examples, batch_size: int) -> tuple[int, float]:  # noqa: ANN001
    """qbreak with passes.fuse_methods: false: FP once (NLL + residuals), then FP + each method side by side."""
    start = time.perf_counter()
    fp_job(fp, examples, batch_size)
    for q in quantized:
        side_by_side(fp, q, examples, batch_size, online=True, full_job=True)
    return 1 + 2 * len(quantized), time.perf_counter() - start


def staged_analysis(fp, quantized, tokenizer, rows, examples, batch_size: int) -> tuple[int, float]:  # noqa: ANN001
    """The same statistics one stage at a time: lm-eval NLL and a residual pass per model, a KL pass
    (FP + quantized) and an amplification pass (FP, with the quantized MLPs) per method. The KL pass
    is qbreak's own online one (lm-eval has none), so this side gets qbreak's head speed-up too."""
    start = time.perf_counter()
    for model in (fp, *quantized):
        lm_eval_nll(model, tokenizer, rows, batch_size)
        run_pass(model, iter_batches(examples, batch_size), [ResidualStatistic("m", "x")])
    for q in quantized:
        side_by_side(fp, q, examples, batch_size, online=True, full_job=False)
        run_pass(fp, iter_batches(examples, batch_size), [AmplificationStatistic("m", "q", q)])
    forwards = 2 * (1 + len(quantized)) + 3 * len(quantized)
    return forwards, time.perf_counter() - start


def analysis_flops(model: torch.nn.Module, methods: int) -> dict[str, float]:
    """Matmul FLOPs per token of `fused_analysis`, `per_method_analysis` and `staged_analysis` (2 per
    parameter a token multiplies by). A residual or amplification pass of `run_pass` stops at the
    final hidden state (no head); an NLL or KL pass runs the head (the KL both models' heads; the
    fused pass runs the FP head once more, for every method's KL at once); an amplification adds
    one quantized MLP per layer."""
    full = 2 * forward_params(model)
    head = 2 * model.get_output_embeddings().weight.numel()
    decoder = full - head
    mlp = 2 * mlp_params(model)
    return {
        "fused": full + head + methods * (full + mlp),
        "per method": full + methods * (2 * full + mlp),
        "staged": (1 + methods) * (full + decoder) + methods * (2 * full + decoder + mlp),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, n_examples=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", type=int, default=2, help="quantized models in the analysis comparison (1-2)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of every path; the best time is used")
    args = parser.parse_args()
    configure(args.threads)  # the job's settings: threads, glibc allocator thresholds

    model = load_model(Path(args.model))
    tokenizer = load_tokenizer(args.model)
    examples = read_table(args.examples, EXAMPLES_SCHEMA).slice(0, args.n_examples)
    rows = examples.column("input_ids").to_pylist()
    n_tokens = sum(len(r) for r in rows)
    b = args.batch_size
    lm_eval_nll(model, tokenizer, rows[:b], b)  # warm-up (and lm_eval's imports)
    per_example_nll(model, examples.slice(0, b), "m", "fp", b)

    # 1. One NLL pass, `repeats` times each, interleaved; the best of each (this machine is shared:
    # a neighbour's burst slows one run, not the code).
    # With ≥ 2 threads qbreak's pass runs as two 1-thread streams (passes.default_streams); its
    # one-stream time and the matmuls as two streams are printed beside it.
    streams = args.threads >= 2
    times: dict[str, list[float]] = {"qbreak": [], "lm-eval": [], "matmuls alone": []}
    if streams:
        times |= {"qbreak, one stream": [], "matmuls alone, two streams": []}
    for _ in range(args.repeats):
        ours, seconds = timed(lambda: per_example_nll(model, examples, "m", "fp", b))
        times["qbreak"].append(seconds)
        theirs, seconds = timed(lambda: lm_eval_nll(model, tokenizer, rows, b))
        times["lm-eval"].append(seconds)
        times["matmuls alone"].append(timed(lambda: matmul_ceiling(model, examples, b))[1])
        if streams:
            one_stream, seconds = timed(lambda: per_example_nll(model, examples, "m", "fp", b, streams=1))
            times["qbreak, one stream"].append(seconds)
            times["matmuls alone, two streams"].append(timed(lambda: matmul_ceiling_streams(model, examples, b))[1])
    diff = np.abs(ours.column("nll").to_numpy() - theirs).max()
    best = {name: min(values) for name, values in times.items()}
    print(f"threads {args.threads}, {args.n_examples} examples, {n_tokens} tokens, batch {b}")
    print(f"{'one NLL pass':<28}{'seconds':>9}{'tokens/s':>10}")
    for name, seconds in best.items():
        print(f"{name:<28}{seconds:>9.2f}{n_tokens / seconds:>10.0f}")
    print(f"qbreak / lm-eval tokens/s: {best['lm-eval'] / best['qbreak']:.2f}x; max |ΔNLL| = {diff:.2e}")
    print(f"ceiling (matmuls alone) / lm-eval tokens/s: {best['lm-eval'] / best['matmuls alone']:.2f}x")
    if streams:
        print(f"qbreak one {args.threads}-thread stream / lm-eval: {best['lm-eval'] / best['qbreak, one stream']:.2f}x; "
              f"ceiling as two streams / lm-eval: {best['lm-eval'] / best['matmuls alone, two streams']:.2f}x; "
              f"max |ΔNLL| two streams vs one: {np.abs(ours.column('nll').to_numpy() - one_stream.column('nll').to_numpy()).max():.2e}")

    # 2. The whole analysis of FP + M methods.
    quantized = [rtn_copy(model, bits) for bits in (3, 4)[: args.methods]]
    runs = {
        "qbreak fused pass": lambda: fused_analysis(model, quantized, examples, b),
        "qbreak, a job per method": lambda: per_method_analysis(model, quantized, examples, b),
        "one stage at a time": lambda: staged_analysis(model, quantized, tokenizer, rows, examples, b),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    forwards: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, the best of each
        for name, run in runs.items():
            forwards[name], elapsed = run()
            seconds[name].append(elapsed)
    best = {name: min(values) for name, values in seconds.items()}
    m = len(quantized)
    flops = dict(zip(runs, analysis_flops(model, m).values(), strict=True))
    staged = "one stage at a time"
    print(f"\nanalysis of FP + {m} methods (NLL, KL, residual norms/kurtosis, amplification), best of {args.repeats}:")
    print(f"{'':<28}{'forwards':>9}{'seconds':>9}{'GFLOP/token':>13}{'GFLOP/s':>9}")
    for name in runs:
        print(f"{name:<28}{forwards[name]:>9}{best[name]:>9.1f}{flops[name] / 1e9:>13.2f}"
              f"{flops[name] * n_tokens / best[name] / 1e9:>9.1f}")
    print(f"(every side also runs {m} amplification MLP passes; matmul FLOPs: the staged residual and "
          f"amplification passes skip the head)")
    for name in ("qbreak fused pass", "qbreak, a job per method"):
        print(f"{name} / staged: forwards {forwards[name] / forwards[staged]:.2f}, time {best[name] / best[staged]:.2f}, "
              f"FLOPs {flops[name] / flops[staged]:.2f}")
    print(f"fused pass / a job per method: time {best['qbreak fused pass'] / best['qbreak, a job per method']:.2f}, "
          f"FLOPs {flops['qbreak fused pass'] / flops['qbreak, a job per method']:.2f}")

if __name__ == "__main__":
    main()
