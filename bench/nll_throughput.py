"""NLL-stage throughput vs this machine's float32 matmul peak, measured side by side in one run.

MFU = 2 · N · tokens/s ÷ peak FLOP/s, with N = the parameters a token's forward multiplies by
(decoder weights without the embedding table, plus the lm_head). Compares qbreak's per-example NLL
(chunked log-sum-exp over the final hidden state) with a plain transformers forward + full
log_softmax scoring, on the same examples.

    .venv/bin/python bench/nll_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.nll import per_example_nll
from qbreak.passes import iter_batches


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a size² @ size² matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def forward_params(model: torch.nn.Module) -> int:
    """Parameters multiplied per token: all but the embedding table, plus the lm_head matrix."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters()) - embedding.numel()
    return total + (head.numel() if head is embedding else 0)


@torch.inference_mode()
def naive_nll(model: torch.nn.Module, examples, batch_size: int) -> np.ndarray:
    """Plain transformers scoring: full logits, full-vocabulary log_softmax, gather."""
    out = []
    for batch in iter_batches(examples, batch_size):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token = -logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(2) * batch.attention_mask[:, 1:]
        out.append((token.sum(1) / batch.attention_mask[:, 1:].sum(1)).double().numpy())
    return np.concatenate(out)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m/fp")
    parser.add_argument("--examples", default="results/corpus/wikipedia-vital/smollm2-135m/examples.arrow")
    parser.add_argument("--n-examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(Path(args.model))
    examples = read_table(args.examples, EXAMPLES_SCHEMA).slice(0, args.n_examples)
    n_tokens = sum(len(r) for r in examples.column("input_ids").to_pylist())
    n_params = forward_params(model)
    per_example_nll(model, examples.slice(0, args.batch_size), "m", "fp", args.batch_size)  # warm-up

    peak_before = matmul_peak()
    qbreak, t_qbreak = timed(lambda: per_example_nll(model, examples, "m", "fp", args.batch_size))
    naive, t_naive = timed(lambda: naive_nll(model, examples, args.batch_size))
    peak = max(peak_before, matmul_peak())
    max_diff = float(np.abs(qbreak.column("nll").to_numpy() - naive).max())

    print(f"threads {args.threads}, {args.n_examples} examples, batch {args.batch_size}, {n_tokens} tokens")
    print(f"float32 matmul peak (2048²): {peak / 1e9:.1f} GFLOP/s; forward FLOPs/token 2×{n_params / 1e6:.1f} M")
    print(f"{'path':<34}{'tokens/s':>10}{'MFU':>8}")
    for name, seconds in (("qbreak per_example_nll (chunked)", t_qbreak), ("transformers + log_softmax", t_naive)):
        rate = n_tokens / seconds
        print(f"{name:<34}{rate:>10.0f}{2 * n_params * rate / peak:>8.1%}")
    print(f"speed-up qbreak / naive: {t_naive / t_qbreak:.2f}x; max |ΔNLL| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
