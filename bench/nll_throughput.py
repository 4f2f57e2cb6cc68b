"""Model-pass throughput vs this machine's float32 matmul peak, measured side by side in one run.

MFU = FLOPs per token · tokens/s ÷ peak FLOP/s. A forward costs 2 · N FLOPs per token with N the
parameters a token multiplies by (decoder weights without the embedding table, plus the lm_head);
the side-by-side pass costs two forwards, and the compare job's amplification adds one more MLP
per layer (the quantized MLP on the FP input). The peak is the best 2048² float32 matmul, measured
before and after every timed path (this machine's speed drifts: the largest peak is used, so MFU
is never overstated); with ≥ 2 threads also as one 1-thread matmul per thread at once, the way the
passes' streams use the cores, and the larger of the two counts.

Paths, on the same examples:
- ceiling: the forward's matrix products alone, nothing else (every decoder linear and the head's
  vocabulary blocks at the pass's shapes, on random inputs): the MFU any implementation that keeps
  transformers' matmuls can reach; the gap between it and the NLL pass is the non-matmul work
  (norms, rotary, attention, SiLU·up, residual adds, log-sum-exp); with ≥ 2 threads also as two
  1-thread streams (half the batches each), the layout of the passes' streams, and for the
  side-by-side pass each stream's batches through both models' matmuls;
- with ≥ 2 threads, qbreak's passes as they run by default (two 1-thread streams, `passes.run_pass`)
  and with one stream of all threads (`streams=1`);
- NLL pass: qbreak (online log-sum-exp over vocabulary blocks), the previous chunked path
  (log-sum-exp over full-vocabulary logits of 512 positions), plain transformers + log_softmax;
  the score_fp job's pass (NLL and the residual statistics' hooks);
- side-by-side FP + quantized pass (NLL, KL both ways, top-k KL): qbreak online vs the full-logit
  reference (`CompareStatistic(online=False)`), and the whole compare job (plus residual statistics
  and amplification);
- the fused model pass of the score_model job (`passes.fuse_methods: true`, the default run's): the
  FP model once per batch (NLL, residual statistics) and two methods (RTN W3, W4) beside it (KL,
  their residual statistics, amplification). Its FLOPs: the FP forward, the FP head once more (for
  every method's KL at once), and per method the quantized forward and the amplification MLPs.
NLLs and KLs of the fast paths must agree with the straightforward ones (printed).

This machine shares its cores with other tenants, and a neighbour's burst slows one path and not
the next. So the paths run round-robin `--repeats` times and each path's best time is used (the
median is printed beside it): best-of-k estimates what the code does on an undisturbed machine, as
the best matmul peak does for the hardware.

    .venv/bin/python bench/nll_throughput.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.kl import CompareStatistic, GroupCompareStatistic
from qbreak.models import load_model
from qbreak.nll import DEFAULT_VOCAB_BLOCK, NLLStatistic, block_buffer, block_view, chunk_slices, per_example_nll
from qbreak.passes import iter_batches, run_group_pass, run_pair_pass, run_pass
from qbreak.quantize.base import replace_decoder_weights
from qbreak.quantize.rtn import rtn_quantize_tensor
from qbreak.residuals import AmplificationStatistic, ResidualStatistic
from qbreak.runtime import configure


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s (float32 unless `dtype`) of size² @ size² matmuls: one on all threads, or (given ≥ 2
    threads) one per thread at once, as the passes' streams run; the larger of the two is the peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    threads = torch.get_num_threads()
    if threads < 2:
        return 2 * size**3 / best
    return max(2 * size**3 / best, _concurrent_matmul_peak(a, b, threads, repeats))


def _concurrent_matmul_peak(a: torch.Tensor, b: torch.Tensor, threads: int, repeats: int) -> float:
    """`threads` one-thread matmuls started together (a barrier per round); best round's FLOP/s."""
    start_line, finish_line = threading.Barrier(threads + 1), threading.Barrier(threads + 1)

    def work() -> None:
        for _ in range(repeats + 1):
            start_line.wait()
            a @ b
            finish_line.wait()

    best = float("inf")

    def time_rounds() -> None:
        nonlocal best
        for round_ in range(repeats + 1):  # round 0 warms the new threads up
            start_line.wait()
            begin = time.perf_counter()
            finish_line.wait()
            if round_:
                best = min(best, time.perf_counter() - begin)

    on_one_thread_each([work] * threads, while_running=time_rounds)
    return threads * 2 * a.shape[0] ** 3 / best


def forward_params(model: torch.nn.Module) -> int:
    """Parameters multiplied per token: all but the embedding table, plus the lm_head matrix."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters()) - embedding.numel()
    return total + (head.numel() if head is embedding else 0)


def mlp_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())


@torch.inference_mode()
def matmul_ceiling(model: torch.nn.Module, examples, batch_size: int) -> None:
    """Only the pass's matrix products: each decoder linear on a random [tokens, in] input, then the
    head over vocabulary blocks into one reused buffer (as `nll.token_nll` does), per batch. The random
    inputs are drawn inside the timed call (≈ 0.5% of it), so the ceiling is, if anything, understated."""
    linears = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight
    for batch in iter_batches(examples, batch_size):
        n = batch.input_ids.numel()
        inputs = {k: torch.randn(n, k) for k in {w.shape[1] for w in linears}}
        for w in linears:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        states = inputs[head.shape[1]][: n - batch.input_ids.shape[0]]  # the positions the head scores
        buffer = block_buffer(states.shape[0], head.shape[0], DEFAULT_VOCAB_BLOCK, states.device)
        for block in chunk_slices(head.shape[0], DEFAULT_VOCAB_BLOCK):
            torch.mm(states, head[block].t(), out=block_view(buffer, states.shape[0], block.stop - block.start))


def matmul_ceiling_streams(model: torch.nn.Module, examples, batch_size: int) -> None:  # noqa: ANN001
    """`matmul_ceiling` as the passes' two streams run it: half the batches on each of two one-thread threads."""
    half = examples.num_rows // 2
    parts = (examples.slice(0, half), examples.slice(half))
    on_one_thread_each([lambda part=part: matmul_ceiling(model, part, batch_size) for part in parts])


def matmul_ceiling_pair(fp: torch.nn.Module, q: torch.nn.Module, examples, batch_size: int) -> None:  # noqa: ANN001
    """`matmul_ceiling` as the side-by-side pass's streams run it: each of two one-thread threads
    takes every other batch through the FP model's matmuls, then the quantized model's."""

    def every_other(first: int) -> None:
        for start in range(first * batch_size, examples.num_rows, 2 * batch_size):
            batch = examples.slice(start, batch_size)
            matmul_ceiling(fp, batch, batch_size)
            matmul_ceiling(q, batch, batch_size)

    on_one_thread_each([lambda: every_other(0), lambda: every_other(1)])


def on_one_thread_each(targets: list[Callable[[], None]], while_running: Callable[[], None] = lambda: None) -> None:
    """Run every target in its own Python thread with one torch thread each, then restore the count;
    `while_running` runs in the calling thread meanwhile. torch's count is set before the threads'
    first op, which they keep."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers = [threading.Thread(target=target) for target in targets]
        for worker in workers:
            worker.start()
        while_running()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)


def model_arguments(parser: argparse.ArgumentParser, n_examples: int) -> None:
    """The benches' shared options: the model folder, the examples table, how many, the batch size."""
    parser.add_argument("--model", default="results/models/smollm2-135m/fp")
    parser.add_argument("--examples", default="results/corpus/wikipedia-vital/smollm2-135m/examples.arrow")
    parser.add_argument("--n-examples", type=int, default=n_examples)
    parser.add_argument("--batch-size", type=int, default=8)


def rtn_copy(model: torch.nn.Module, bits: int = 3) -> torch.nn.Module:
    """A real RTN (group 64) copy of `model`: the benches' quantized model."""
    quantized = copy.deepcopy(model)
    replace_decoder_weights(quantized, lambda w: rtn_quantize_tensor(w, bits, 64))
    return quantized


@torch.inference_mode()
def naive_nll(model: torch.nn.Module, examples, batch_size: int, device: str = "cpu") -> np.ndarray:  # noqa: ANN001
    """Plain transformers scoring: full logits, full-vocabulary float32 log_softmax, gather."""
    out = []
    for batch in iter_batches(examples, batch_size, device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token = -logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(2) * batch.attention_mask[:, 1:]
        out.append((token.sum(1) / batch.attention_mask[:, 1:].sum(1)).double().cpu().numpy())
        del logits, logp  # before the next batch's logits exist (GPU memory)
    return np.concatenate(out)


@torch.inference_mode()
def chunked_full_vocab_nll(model: torch.nn.Module, examples, batch_size: int, chunk: int = 512) -> np.ndarray:
    """qbreak's previous path: final hidden state, full-vocabulary logits of `chunk` positions at a time."""
    out = []
    head = model.get_output_embeddings()
    for batch in iter_batches(examples, batch_size):
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask[:, 1:].bool()
        states, targets = hidden[:, :-1][mask], batch.input_ids[:, 1:][mask]
        nll = torch.empty(states.shape[0])
        for start in range(0, states.shape[0], chunk):
            logits = torch.nn.functional.linear(states[start : start + chunk], head.weight)
            target = logits.gather(1, targets[start : start + chunk, None]).squeeze(1)
            nll[start : start + chunk] = torch.logsumexp(logits, dim=-1) - target
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
        sums = torch.zeros(mask.shape[0], dtype=torch.float64).index_add_(0, rows, nll.double())
        out.append((sums / mask.sum(1)).numpy())
    return np.concatenate(out)


def fp_job(model: torch.nn.Module, examples, batch_size: int, streams: int | None = None) -> ResidualStatistic:  # noqa: ANN001
    """The score_fp job's pass: NLL and the residual statistics' hooks in one forward per batch."""
    residuals = ResidualStatistic("m", "fp")
    run_pass(model, iter_batches(examples, batch_size), [NLLStatistic("m", "fp"), residuals], streams=streams)
    return residuals


def side_by_side(
    fp, q, examples, batch_size: int, online: bool, full_job: bool, streams: int | None = None  # noqa: ANN001
) -> CompareStatistic:
    compare = CompareStatistic("m", "q", online=online)
    fp_stats = [AmplificationStatistic("m", "q", q)] if full_job else []
    q_stats = [ResidualStatistic("m", "q")] if full_job else []
    run_pair_pass(
        fp, q, iter_batches(examples, batch_size), [compare], fp_statistics=fp_stats, q_statistics=q_stats,
        streams=streams,
    )
    return compare


def fused_job(
    fp: torch.nn.Module, quantized: list[torch.nn.Module], examples, batch_size: int, streams: int | None = None  # noqa: ANN001
) -> list[CompareStatistic]:
    """The score_model job's pass: the FP model once per batch (NLL, residual statistics), every
    quantized model beside it (KL with the FP head once for all, its residual statistics, the
    amplification); each method's KL statistic."""
    names = [f"q{i}" for i in range(len(quantized))]
    compare = GroupCompareStatistic("m", names)
    run_group_pass(
        fp, quantized, iter_batches(examples, batch_size), [[] for _ in names],
        fp_statistics=[NLLStatistic("m", "fp"), ResidualStatistic("m", "fp"),
                       *(AmplificationStatistic("m", name, q) for name, q in zip(names, quantized, strict=True))],
        q_statistics=[[ResidualStatistic("m", name)] for name in names], streams=streams, group_statistics=[compare],
    )
    return list(compare.methods.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, n_examples=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds over the paths; best time used")
    args = parser.parse_args()
    configure(args.threads)  # the job's settings: threads, glibc allocator thresholds

    model = load_model(Path(args.model))
    quantized = rtn_copy(model)  # a real RTN W3 model
    methods = [quantized, rtn_copy(model, bits=4)]  # the fused pass's two methods
    examples = read_table(args.examples, EXAMPLES_SCHEMA).slice(0, args.n_examples)
    n_tokens = sum(len(r) for r in examples.column("input_ids").to_pylist())
    n_params, n_mlp = forward_params(model), mlp_params(model)
    per_example_nll(model, examples.slice(0, args.batch_size), "m", "fp", args.batch_size)  # warm-up

    peaks: list[float] = [matmul_peak()]
    b = args.batch_size
    pair = 4 * n_params
    head = 2 * model.get_output_embeddings().weight.numel()
    fused = 2 * n_params + head + len(methods) * (2 * n_params + 2 * n_mlp)
    paths: list[tuple[str, float, Callable[[], object]]] = [
        ("ceiling: the forward's matmuls alone", 2 * n_params, lambda: matmul_ceiling(model, examples, b)),
        ("ceiling, two 1-thread streams", 2 * n_params, lambda: matmul_ceiling_streams(model, examples, b)),
        ("NLL: qbreak (online log-sum-exp)", 2 * n_params, lambda: per_example_nll(model, examples, "m", "fp", b)),
        ("NLL: qbreak, one stream", 2 * n_params, lambda: per_example_nll(model, examples, "m", "fp", b, streams=1)),
        ("NLL: previous chunked path", 2 * n_params, lambda: chunked_full_vocab_nll(model, examples, b)),
        ("NLL: transformers + log_softmax", 2 * n_params, lambda: naive_nll(model, examples, b)),
        ("score_fp job: NLL + residual statistics", 2 * n_params, lambda: fp_job(model, examples, b)),
        ("score_fp job, one stream", 2 * n_params, lambda: fp_job(model, examples, b, 1)),
        ("ceiling, FP+Q: two 1-thread streams", pair, lambda: matmul_ceiling_pair(model, quantized, examples, b)),
        ("FP+Q: qbreak online KL", pair, lambda: side_by_side(model, quantized, examples, b, True, False)),
        ("FP+Q: qbreak, one stream", pair, lambda: side_by_side(model, quantized, examples, b, True, False, 1)),
        ("FP+Q: full-logit KL reference", pair, lambda: side_by_side(model, quantized, examples, b, False, False)),
        ("compare job: + residuals, amplification", pair + 2 * n_mlp,
         lambda: side_by_side(model, quantized, examples, b, True, True)),
        ("compare job, one stream", pair + 2 * n_mlp, lambda: side_by_side(model, quantized, examples, b, True, True, 1)),
        ("score_model job: FP + 2 methods fused", fused, lambda: fused_job(model, methods, examples, b)),
        ("score_model job, one stream", fused, lambda: fused_job(model, methods, examples, b, 1)),
    ]
    if args.threads < 2:  # one thread: the passes run one stream, the default paths are those
        paths = [path for path in paths if "stream" not in path[0]]
    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    results: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, _, fn in paths:
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            peaks.append(matmul_peak())
    rows = [(name, min(times[name]), float(np.median(times[name])), flops) for name, flops, _ in paths]
    peak = max(peaks)

    print(f"threads {args.threads}, {args.n_examples} examples × {n_tokens // args.n_examples} tokens, batch {b}")
    print(f"float32 matmul peak (2048², best of {len(peaks)} measurements between the paths): {peak / 1e9:.1f} "
          f"GFLOP/s (lowest {min(peaks) / 1e9:.1f}); forward 2×{n_params / 1e6:.1f} M FLOPs/token, MLPs {n_mlp / 1e6:.1f} M")
    print(f"best of {args.repeats} round-robin runs per path (median MFU beside it)")
    print(f"{'path':<44}{'seconds':>9}{'tokens/s':>10}{'MFU':>8}{'median':>8}")
    for name, seconds, median, flops in rows:
        rate = n_tokens / seconds
        print(f"{name:<44}{seconds:>9.2f}{rate:>10.0f}{flops * rate / peak:>8.1%}{flops * n_tokens / median / peak:>8.1%}")
    nll_fast = results["NLL: qbreak (online log-sum-exp)"].column("nll").to_numpy()
    by_name = {name: seconds for name, seconds, _, _ in rows}
    print(f"NLL speed-up vs previous chunked path {by_name['NLL: previous chunked path'] / by_name['NLL: qbreak (online log-sum-exp)']:.2f}x, "
          f"vs transformers {by_name['NLL: transformers + log_softmax'] / by_name['NLL: qbreak (online log-sum-exp)']:.2f}x")
    ceiling = min(seconds for name, seconds in by_name.items() if name.startswith("ceiling") and "FP+Q" not in name)
    print(f"NLL pass / matmul ceiling: {ceiling / by_name['NLL: qbreak (online log-sum-exp)']:.1%} "
          f"(the rest of a forward is non-matmul work)")
    pair_ceiling = by_name.get("ceiling, FP+Q: two 1-thread streams")
    if pair_ceiling is not None:
        print(f"FP+Q pass / its matmul ceiling: {pair_ceiling / by_name['FP+Q: qbreak online KL']:.1%}")
    if "NLL: qbreak, one stream" in by_name:
        print(f"two 1-thread streams vs one {args.threads}-thread stream: NLL pass "
              f"{by_name['NLL: qbreak, one stream'] / by_name['NLL: qbreak (online log-sum-exp)']:.2f}x, FP+Q pass "
              f"{by_name['FP+Q: qbreak, one stream'] / by_name['FP+Q: qbreak online KL']:.2f}x, score_fp job "
              f"{by_name['score_fp job, one stream'] / by_name['score_fp job: NLL + residual statistics']:.2f}x, compare job "
              f"{by_name['compare job, one stream'] / by_name['compare job: + residuals, amplification']:.2f}x, score_model job "
              f"{by_name['score_model job, one stream'] / by_name['score_model job: FP + 2 methods fused']:.2f}x")
        for name, other in (("NLL", "NLL: qbreak, one stream"), ("FP+Q", "FP+Q: qbreak, one stream")):
            one = results[other]
            many = results["NLL: qbreak (online log-sum-exp)" if name == "NLL" else "FP+Q: qbreak online KL"]
            if name == "FP+Q":
                one, many = one.kl_table(), many.kl_table()
            column = "nll" if name == "NLL" else "kl_fp_q"
            print(f"max |Δ{column}| two streams vs one: {np.abs(one.column(column).to_numpy() - many.column(column).to_numpy()).max():.2e}")
        same = results["score_fp job, one stream"].result().equals(results["score_fp job: NLL + residual statistics"].result())
        print(f"score_fp residual statistics, two streams vs one: {'identical' if same else 'DIFFERENT'}")
    fused_kl = results["score_model job: FP + 2 methods fused"][0].kl_table()
    compare_kl = results["compare job: + residuals, amplification"].kl_table()
    same = all(fused_kl.column(c).equals(compare_kl.column(c)) for c in ("example_id", "kl_fp_q", "kl_q_fp", "kl_fp_q_topk"))
    print(f"score_model job's KL of RTN W3 vs the compare job's: {'identical' if same else 'DIFFERENT'}")
    print(f"FP+Q speed-up vs full-logit KL {by_name['FP+Q: full-logit KL reference'] / by_name['FP+Q: qbreak online KL']:.2f}x")
    for name in ("NLL: previous chunked path", "NLL: transformers + log_softmax"):
        print(f"max |ΔNLL| qbreak vs {name[5:]}: {np.abs(nll_fast - results[name]).max():.2e}")
    fast, ref = (results[k].kl_table() for k in ("FP+Q: qbreak online KL", "FP+Q: full-logit KL reference"))
    for column in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"):
        diff = np.abs(fast.column(column).to_numpy() - ref.column(column).to_numpy()).max()
        print(f"max |Δ{column}| online vs full-logit: {diff:.2e}")


if __name__ == "__main__":
    main()
