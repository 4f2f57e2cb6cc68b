"""Matmul ceiling of the side-by-side FP + quantized pass in three layouts on two threads, in one run.

The pass's matrix products alone (`nll_throughput.matmul_ceiling`: every decoder linear and the
head's vocabulary blocks at the pass's shapes, on random inputs), for the FP model and an RTN W3
copy, each layout on two one-thread threads:

- single-model streams: FP's matmuls as two streams (half the batches each), then the quantized
  model's the same way: both threads always read the same weights;
- model per stream (the side-by-side pass's layout until 2026-12-04): every batch through FP's
  matmuls on one thread and through the quantized model's on the other;
- batch per stream (the pass's layout since, `nll_throughput.matmul_ceiling_pair`): each thread
  takes every other batch through FP's matmuls, then the quantized model's.

Equal MFU means the layout does not limit the pass (two weight sets in the caches at once cost
nothing measurable). Round-robin `--repeats` rounds, best time used, median beside it; MFU against
the best 2048² matmul peak measured between the paths.

    .venv/bin/python bench/pair_layout.py --n-examples 32 --repeats 6
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nll_throughput import (  # noqa: E402
    forward_params,
    matmul_ceiling,
    matmul_ceiling_pair,
    matmul_ceiling_streams,
    matmul_peak,
    model_arguments,
    on_one_thread_each,
    rtn_copy,
)

from qbreak.io import EXAMPLES_SCHEMA, read_table  # noqa: E402
from qbreak.models import load_model  # noqa: E402
from qbreak.runtime import configure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, n_examples=32)
    parser.add_argument("--repeats", type=int, default=4, help="round-robin rounds over the layouts; best time used")
    args = parser.parse_args()
    configure(2)

    fp = load_model(Path(args.model))
    q = rtn_copy(fp)
    examples = read_table(args.examples, EXAMPLES_SCHEMA).slice(0, args.n_examples)
    n_tokens = sum(len(r) for r in examples.column("input_ids").to_pylist())
    b = args.batch_size

    def model_per_stream() -> None:
        on_one_thread_each([lambda model=model: matmul_ceiling(model, examples, b) for model in (fp, q)])

    layouts: dict[str, Callable[[], None]] = {
        "single-model streams (FP's, then Q's)": lambda: [matmul_ceiling_streams(m, examples, b) for m in (fp, q)],
        "model per stream (until 2026-12-04)": model_per_stream,
        "batch per stream (the pass's layout)": lambda: matmul_ceiling_pair(fp, q, examples, b),
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    peaks = [matmul_peak()]
    for _ in range(args.repeats):
        for name, fn in layouts.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peaks.append(matmul_peak())
    peak, flops = max(peaks), 4 * forward_params(fp) * n_tokens
    print(f"{args.n_examples} examples, batch {b}, two 1-thread threads; peak {peak / 1e9:.1f} GFLOP/s "
          f"(lowest {min(peaks) / 1e9:.1f}); best of {args.repeats} (median MFU beside it)")
    for name, seconds in times.items():
        print(f"{name:<40}{min(seconds):>8.2f} s{flops / min(seconds) / peak:>8.1%}{flops / np.median(seconds) / peak:>8.1%}")


if __name__ == "__main__":
    main()
