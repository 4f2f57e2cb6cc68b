"""qbreak's model passes on a GPU at the paper's model sizes: MFU against a bfloat16 matmul peak
measured in the same run, and the head's chunk and block sizes that suit a GPU.

The README's cost at the paper's scale divides FLOPs by an MFU; this bench measures that MFU where
such runs happen. The model hubs are unreachable from the machines this project measures on, so
each model is built from its architecture's config with random bfloat16 weights (a pass's speed
does not depend on the weights' values); the quantized model is a real RTN copy (4 bits, group
64, dequantized as every qbreak method stores it); the tokens are random ids. Only the top-k
merge's work depends on the logits' values (`kl._merge_topk` skips rows whose block maximum cannot
enter their top k): random weights make that part slower than on a real model's frequency-ordered
vocabulary, never faster.

MFU = FLOPs per token · tokens/s ÷ peak, with 2 · N FLOPs per token and forward (N: the decoder's
weights without the embedding table, plus the lm_head; attention scores not counted, < 1% at these
sizes and 512 tokens). The peak is the best 8192³ bfloat16 torch.mm, measured before and after
every path; the largest counts, so MFU is never overstated. Paths, each on the same batches:
- NLL: transformers' forward + full-vocabulary log_softmax (what lm-eval's HFLM runs), and
  qbreak's NLL pass (`run_pass` + `NLLStatistic`) with each `--heads` chunk × vocabulary block
  (the CPU's 1024 × 2048, the device's default from `nll.head_sizes`, the whole vocabulary);
- FP + quantized (NLL, KL both ways, top-k KL: `run_pair_pass` + `CompareStatistic`) with each
  head size, and the whole compare job with the first (+ residual statistics, amplification);
- with `--stages`, the logit lens over every layer and the patching sweep (4 sites on every
  `--sweep-stride`-th layer, each resuming at its layer: FLOPs counted as run);
- the peak GPU memory each path allocated.

    python3 bench/gpu_passes.py --shapes llama-3-8b smollm2-135m --repeats 3
    .venv/bin/python bench/gpu_passes.py --device cpu --shapes tiny --n-batches 2 --seq 64   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from nll_throughput import forward_params, mlp_params, naive_nll, rtn_copy

from qbreak.kl import CompareStatistic
from qbreak.lens import logit_lens
from qbreak.nll import NLLStatistic, head_sizes
from qbreak.passes import iter_batches, run_pair_pass, run_pass
from qbreak.patching import Patch, build_patches, patching_table
from qbreak.residuals import AmplificationStatistic, ResidualStatistic

# Architecture configs of the models in the paper's size range (public config.json values).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0),
    "mistral-nemo-12b": dict(model_type="mistral", hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                             tie_word_embeddings=False, rope_theta=1000000.0),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}


def build_model(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A causal LM of the named architecture with random weights, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Best FLOP/s of one size² @ size² matmul."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def random_examples(n: int, seq: int, vocab: int, seed: int = 0) -> pa.Table:
    """An examples table (example_id, input_ids) of `n` random sequences of `seq` tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq), dtype=np.int64)
    return pa.table({"example_id": np.arange(n, dtype=np.int32), "input_ids": list(ids)})


Head = tuple[int | None, int | None]  # (chunk positions, vocabulary block); None: the device's default


def parse_head(text: str) -> Head:
    if text == "default":
        return None, None
    chunk, block = text.split("x")
    return int(chunk), int(block)


def head_name(head: Head, device: str) -> str:
    chunk, block = head_sizes(device, *head)
    return f"{chunk}x{block}" + (" (default)" if head == (None, None) else "")


def nll_pass(model: torch.nn.Module, examples: pa.Table, batch_size: int, device: str, head: Head) -> np.ndarray:
    statistic = NLLStatistic("m", "fp", chunk_tokens=head[0], vocab_block=head[1])
    run_pass(model, iter_batches(examples, batch_size, device), [statistic])
    return statistic.result().column("nll").to_numpy()


def pair_pass(
    fp: torch.nn.Module, q: torch.nn.Module, examples: pa.Table, batch_size: int, device: str, head: Head,
    full_job: bool = False,
) -> pa.Table:
    compare = CompareStatistic("m", "q", chunk_tokens=head[0], vocab_block=head[1])
    fp_stats = [AmplificationStatistic("m", "q", q)] if full_job else []
    q_stats = [ResidualStatistic("m", "q")] if full_job else []
    run_pair_pass(fp, q, iter_batches(examples, batch_size, device), [compare], fp_statistics=fp_stats,
                  q_statistics=q_stats)
    return compare.kl_table()


def sweep_patches(n_layers: int, stride: int) -> list[Patch]:
    """The unpatched run and the paper's per-layer sweep (4 sites, every `stride`-th layer)."""
    patches = build_patches(n_layers, ["attn", "gate", "up", "down"], list(range(0, n_layers, stride)), None)
    return [p for p in patches if p.label.isdigit() or p.site == "none"]


def sweep_flops(n_params: int, head_params: int, n_layers: int, patches: list[Patch]) -> float:
    """FLOPs per token of `patching_table` on these patches: the FP and the unpatched quantized
    decoder once, then per patch the decoder from its layer on (`patching.run_from`) and the head."""
    layer_params = (n_params - head_params) / n_layers
    resumed = sum((n_layers - min(p.layers)) * layer_params for p in patches if p.layers)
    return 2 * (2 * (n_params - head_params) + resumed + len(patches) * head_params)


def bench_shape(shape: str, args: argparse.Namespace, dtype: torch.dtype, peaks: list[float]) -> list[dict[str, Any]]:
    device = args.device
    start = time.perf_counter()
    fp = build_model(shape, dtype, device)
    quantized = rtn_copy(fp, bits=4)
    synchronize(device)
    built = time.perf_counter() - start
    n_params, n_mlp = forward_params(fp), mlp_params(fp)
    examples = random_examples(args.n_batches * args.batch_size, args.seq, fp.config.vocab_size)
    n_tokens = examples.num_rows * args.seq
    heads = [parse_head(h) for h in args.heads]
    b = args.batch_size
    paths: list[tuple[str, float, Callable[[], object]]] = [
        ("NLL: transformers + log_softmax", 2 * n_params, lambda: naive_nll(fp, examples, b, device)),
    ]
    for head in heads:
        paths.append((f"NLL: qbreak, head {head_name(head, device)}", 2 * n_params,
                      lambda head=head: nll_pass(fp, examples, b, device, head)))
    for head in heads:
        paths.append((f"FP+Q: qbreak, head {head_name(head, device)}", 4 * n_params,
                      lambda head=head: pair_pass(fp, quantized, examples, b, device, head)))
    paths.append((f"compare job, head {head_name(heads[-1], device)}", 4 * n_params + 2 * n_mlp,
                  lambda: pair_pass(fp, quantized, examples, b, device, heads[-1], full_job=True)))
    n_layers, head_params = fp.config.num_hidden_layers, fp.get_output_embeddings().weight.numel()
    if "lens" in args.stages:  # every layer decoded through the final norm and the head
        paths.append(("logit lens, every layer", 2 * n_params + 2 * n_layers * head_params,
                      lambda: logit_lens(fp, examples, "m", "fp", None, b, device)))
    if "patching" in args.stages:
        patches = sweep_patches(n_layers, args.sweep_stride)
        paths.append((f"patching sweep, {len(patches) - 1} patches", sweep_flops(n_params, head_params, n_layers, patches),
                      lambda: patching_table(fp, quantized, examples, "m", "q", patches, b, device)))
    for _, _, fn in paths:  # warm-up: kernels, allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    memory: dict[str, float] = {}
    results: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, _, fn in paths:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            t0 = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            if device.startswith("cuda"):
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
            peaks.append(matmul_peak(device, dtype, args.peak_size))
    peak = max(peaks)
    weights_gib = sum(p.numel() * p.element_size() for p in fp.parameters()) / 2**30
    print(f"\n== {shape}: forward 2 × {n_params / 1e9:.3f} G FLOPs/token, {fp.config.num_hidden_layers} layers, "
          f"vocab {fp.config.vocab_size}; {weights_gib:.1f} GiB of weights per model; built + RTN copy in {built:.0f} s")
    print(f"{examples.num_rows} examples × {args.seq} tokens, batch {b}; peak {peak / 1e12:.1f} TFLOP/s "
          f"(lowest {min(peaks) / 1e12:.1f}); best of {args.repeats} (median MFU beside it)")
    print(f"{'path':<50}{'seconds':>9}{'tokens/s':>11}{'MFU':>8}{'median':>8}{'GiB':>8}")
    rows = []
    for name, flops, _ in paths:
        best, median = min(times[name]), float(np.median(times[name]))
        rate = n_tokens / best
        mfu, mfu_median = flops * rate / peak, flops * n_tokens / median / peak
        print(f"{name:<50}{best:>9.3f}{rate:>11.0f}{mfu:>8.1%}{mfu_median:>8.1%}{memory.get(name, float('nan')):>8.1f}")
        rows.append(dict(shape=shape, path=name, seconds=best, median_seconds=median, tokens_per_s=rate, mfu=mfu,
                         mfu_median=mfu_median, peak_gib=memory.get(name), tokens=n_tokens, peak_flops=peak))
    reference = results["NLL: transformers + log_softmax"]
    for name, _, _ in paths:
        if name.startswith("NLL: qbreak"):
            print(f"max |ΔNLL| {name[5:]} vs transformers: {np.abs(results[name] - reference).max():.2e}")
    kl = [results[name].column("kl_fp_q").to_numpy() for name, _, _ in paths if name.startswith(("FP+Q", "compare"))]
    print(f"max |ΔKL(P_fp‖P_q)| between the head sizes and the compare job: {max(np.abs(k - kl[0]).max() for k in kl):.2e}"
          f" (mean KL {kl[0].mean():.4f} nats)")
    del fp, quantized
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3-8b", "smollm2-135m"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="tokens per example (the paper's 512)")
    parser.add_argument("--n-batches", type=int, default=8)
    parser.add_argument("--heads", nargs="+", default=["1024x2048", "default", "4096x131072"],
                        help="head sizes: chunk positions x vocabulary block, or 'default' (the device's, "
                        "nll.head_sizes); 1024x2048 is the CPU's; the compare job takes the last")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds over the paths; best time used")
    parser.add_argument("--stages", nargs="*", default=[], choices=["lens", "patching"],
                        help="also the logit lens (every layer) and the patching sweep")
    parser.add_argument("--sweep-stride", type=int, default=4, help="patching sweep: every stride-th layer")
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = False
    peaks = [matmul_peak(args.device, dtype, args.peak_size)]
    rows = [row for shape in args.shapes for row in bench_shape(shape, args, dtype, peaks)]
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
