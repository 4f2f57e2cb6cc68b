"""Per-layer patching sweep: qbreak's prefix-reusing sweep vs the naive one, side by side in one run.

Three ways to score the same patches on the same examples (the NLLs must agree):

- naive: per (site, layer) patch, one FP forward to get the activation and one full quantized
  forward with it (what a hook script with a run-with-cache per patch does);
- FP-cached: FP once per batch for every patch, then one full quantized forward per patch;
- qbreak: FP once per batch, and each patch resumes at its layer from the recorded unpatched
  quantized state.

With ≥ 2 threads the FP-cached and qbreak sweeps score each batch's patches on two 1-thread streams
(`patching_table`'s default); the naive sweep runs as a hook script would, one stream of all
threads (a single patch per call leaves a second stream nothing to do). qbreak's sweep on one
stream is timed too.

It prints qbreak's time over each baseline (the issue's goal: ≤ 0.5 of the naive sweep) and the
bound of prefix reuse from FLOPs: a patch at layer l still runs layers l … L−1 and the lm_head.

    .venv/bin/python bench/patching_sweep.py --threads 2 --examples 8 --stride 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from qbreak.hooks import decoder_layers
from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.patching import build_patches, patching_table
from qbreak.runtime import configure


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
    configure(args.threads)  # the job's settings: threads, glibc allocator thresholds
    root = Path(args.results)
    examples = read_table(root / "corpus" / "wikipedia-vital" / args.model / "examples.arrow", EXAMPLES_SCHEMA)
    examples = examples.slice(0, args.examples)
    fp = load_model(root / "models" / args.model / "fp")
    quantized = load_model(root / "models" / args.model / args.method)
    n_layers = len(decoder_layers(fp))
    patches = build_patches(n_layers, ["attn", "gate", "up", "down"], list(range(0, n_layers, args.stride)), None)
    patches = [p for p in patches if p.label.isdigit() or p.site == "none"]  # the sweep only
    timings, tables = {}, {}

    def run(name: str, fast: bool, per_patch: bool = False, streams: int | None = None) -> None:
        start = time.perf_counter()
        if per_patch:  # FP forward again for every patch
            parts = [patching_table(fp, quantized, examples, args.model, args.method, [p], args.batch_size, fast=False,
                                    streams=1)
                     for p in patches]
            tables[name] = pa.concat_tables(parts).sort_by([("site", "ascending"), ("layers", "ascending"),
                                                            ("example_id", "ascending")])
        else:
            table = patching_table(fp, quantized, examples, args.model, args.method, patches, args.batch_size,
                                   fast=fast, streams=streams)
            tables[name] = table.sort_by([("site", "ascending"), ("layers", "ascending"), ("example_id", "ascending")])
        timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)

    for _ in range(2):
        run("fp_cached", False)
        run("qbreak", True)
        if args.threads >= 2:
            run("qbreak_one_stream", True, streams=1)
    run("naive", False, per_patch=True)
    ours = timings["qbreak"]
    diff = max(np.abs(tables[b].column("nll").to_numpy() - tables["qbreak"].column("nll").to_numpy()).max()
               for b in tables)
    tokens = int(sum(examples.column("n_tokens").to_pylist()))
    layer_params = sum(p.numel() for p in decoder_layers(fp)[0].parameters())
    head = fp.get_output_embeddings().weight.numel() / layer_params  # lm_head cost in layers
    swept = sorted({min(p.layers) for p in patches if p.layers})
    suffix = np.mean([n_layers - first + head for first in swept])
    print(f"{len(patches) - 1} patches (4 sites × {len(swept)} layers) on {args.examples} examples "
          f"({tokens} tokens), {args.method}, {args.threads} threads")
    print(f"naive sweep      {timings['naive']:8.1f} s  (FP forward + full quantized forward per patch)")
    print(f"FP-cached sweep  {timings['fp_cached']:8.1f} s  (FP once per batch, full quantized forward per patch)")
    print(f"qbreak sweep     {ours:8.1f} s  (FP once per batch, resumes at the patched layer)")
    if "qbreak_one_stream" in timings:
        print(f"qbreak, one stream {timings['qbreak_one_stream']:6.1f} s  (all threads on each op; "
              f"two streams / one: {timings['qbreak_one_stream'] / ours:.2f}x faster)")
    print(f"ratio qbreak / naive = {ours / timings['naive']:.3f}   qbreak / FP-cached = "
          f"{ours / timings['fp_cached']:.3f}   max |ΔNLL| = {diff:.2e}")
    print(f"FLOP bound of prefix reuse vs FP-cached: lm_head = {head:.1f} layers, mean (L − l + head) / (L + head) = "
          f"{suffix / (n_layers + head):.3f}")


if __name__ == "__main__":
    main()
