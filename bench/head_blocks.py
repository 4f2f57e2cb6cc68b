"""The online head's speed by vocabulary block size, vs the 2048² float32 matmul peak, in one run.

`nll.token_nll` computes the lm_head in blocks of `vocab_block` rows into one reused float32 buffer
and folds each block's log-sum-exp into a running one. Smaller blocks keep the [chunk, block] logits
in cache for the log-sum-exp that reads them back; too small a block makes each matmul thin. This
times `token_nll` (matmul + log-sum-exp + target logits) at the default model's head shape for
several block sizes, round-robin, best of `--repeats`, and prints each as a share of the peak
(FLOPs of the head matmul only) beside one plain full-vocabulary matmul. The results must agree
with the default block size to float32 rounding (printed).

    .venv/bin/python bench/head_blocks.py --threads 2 --repeats 12
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qbreak.nll import DEFAULT_CHUNK_TOKENS, DEFAULT_VOCAB_BLOCK, token_nll
from qbreak.runtime import configure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1016, help="scored positions of one batch (8 × 127)")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    configure(args.threads)  # the job's settings: threads, glibc allocator thresholds
    gen = torch.Generator().manual_seed(0)
    n, d, vocab = args.positions, args.d_model, args.vocab
    hidden = torch.randn(n, d, generator=gen) * 0.5
    weight = torch.randn(vocab, d, generator=gen) * 0.05
    targets = torch.randint(0, vocab, (n,), generator=gen)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)

    head_flops = 2 * n * d * vocab
    paths: dict[str, tuple[float, Callable[[], object]]] = {"2048² matmul (peak)": (2 * 2048**3, lambda: a @ b)}
    for block in args.blocks:
        paths[f"token_nll, block {block}"] = (
            head_flops, lambda block=block: token_nll(hidden, weight, targets, None, DEFAULT_CHUNK_TOKENS, block)
        )
    paths["plain full-vocabulary matmul"] = (head_flops, lambda: hidden @ weight.t())
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):
        for name, (_, fn) in paths.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    peak = paths["2048² matmul (peak)"][0] / best["2048² matmul (peak)"]
    print(f"threads {args.threads}, head [{n} × {d}] · [{d} × {vocab}], best of {args.repeats} round-robin; "
          f"peak {peak / 1e9:.1f} GFLOP/s; default block {DEFAULT_VOCAB_BLOCK}")
    print(f"{'path':<32}{'ms':>9}{'of peak':>9}")
    for name, (flops, _) in paths.items():
        print(f"{name:<32}{best[name] * 1e3:>9.1f}{flops / best[name] / peak:>9.1%}")
    reference = token_nll(hidden, weight, targets)
    for block in args.blocks:
        diff = (token_nll(hidden, weight, targets, None, DEFAULT_CHUNK_TOKENS, block) - reference).abs().max()
        print(f"max |ΔNLL| block {block} vs default: {diff:.1e}")


if __name__ == "__main__":
    main()
