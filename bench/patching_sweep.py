"""Per-layer patching sweep: qbreak's prefix-reusing sweep vs the naive one, side by side in one run.

The naive sweep runs one full quantized forward per (site, layer) patch; qbreak's starts each patch
at its layer from the recorded unpatched quantized state. Both score the same patches on the same
examples; the NLLs must agree and the script prints the time ratio (goal ≤ 0.5).

    .venv/bin/python bench/patching_sweep.py --threads 2 --examples 8 --stride 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qbreak.hooks import decoder_layers
from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.patching import build_patches, patching_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="a finished default run's results folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="rtn-w3-g64")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--stride", type=int, default=3, help="sweep every stride-th layer (1 = all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.results)
    examples = read_table(root / "corpus" / "wikipedia-vital" / args.model / "examples.arrow", EXAMPLES_SCHEMA)
    examples = examples.slice(0, args.examples)
    fp = load_model(root / "models" / args.model / "fp")
    quantized = load_model(root / "models" / args.model / args.method)
    n_layers = len(decoder_layers(fp))
    patches = build_patches(n_layers, ["attn", "gate", "up", "down"], list(range(0, n_layers, args.stride)), None)
    patches = [p for p in patches if p.label.isdigit() or p.site == "none"]  # the sweep only
    timings, tables = {}, {}
    for name, fast in (("naive", False), ("qbreak", True), ("naive again", False), ("qbreak again", True)):
        start = time.perf_counter()
        tables[name] = patching_table(fp, quantized, examples, args.model, args.method, patches, args.batch_size,
                                      fast=fast)
        timings[name] = time.perf_counter() - start
    naive = min(timings["naive"], timings["naive again"])
    ours = min(timings["qbreak"], timings["qbreak again"])
    diff = np.abs(tables["naive"].column("nll").to_numpy() - tables["qbreak"].column("nll").to_numpy()).max()
    tokens = int(sum(examples.column("n_tokens").to_pylist()))
    print(f"{len(patches) - 1} patches (4 sites × {len(patches[1:]) // 4} layers) on {args.examples} examples "
          f"({tokens} tokens), {args.method}, {args.threads} threads")
    print(f"naive sweep   {naive:8.1f} s  (one full forward per patch)")
    print(f"qbreak sweep  {ours:8.1f} s  (resumes at the patched layer)")
    print(f"ratio qbreak / naive = {ours / naive:.3f}   max |ΔNLL| = {diff:.2e}")


if __name__ == "__main__":
    main()
