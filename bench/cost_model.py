"""Cost model of every model stage, and what the paper's full setup costs on GPUs and a cluster.

FLOPs per token of a forward: 2·P (P = decoder weights a token multiplies by plus the lm_head) plus
causal attention scores, 2·L·s·(heads·head_dim) at sequence length s. Per stage, with T evaluation
tokens per model, S tokens of D_large ∪ D_ctrl, M methods:

    score_fp          T · F                               1 copy of the weights
    compare_to_fp     M · T · (2F + 2·P_mlp)              2 copies (FP and quantized side by side)
    logit_lens        (M + 1) · S · (F + n_lens · 2·V·d)  1 copy
    restore_layers    M · S · F · n_ranges                2 copies
    patch_activations m · S · F · (2 + Σ_patches (L − l)/L + n_patches · head share)   2 copies
    quantize (GPTQ)   n_cal · s · F · 2 (sequential calibration, two passes per layer) + the solves

Activations are per batch only (memory independent of T: bench/memory_scaling.py). Seconds =
FLOPs ÷ (data-sheet peak × MFU), weights in bfloat16. Each stage's MFU was measured for this code
on an H200 by bench/gpu_passes.py at Llama-3-8B's shape (2026-12-04, `MEASURED`), as a fraction of
the 8192³ bf16 matmul peak measured in the same run and converted to a fraction of the 989 TFLOP/s
data sheet. The A100 column assumes the same fractions of its data sheet (not measured).

    .venv/bin/python bench/cost_model.py              # the measured H200 MFUs
    .venv/bin/python bench/cost_model.py --mfu 0.30   # what-if: one MFU for every stage
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Decoder shape, from each model's public config.json."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def attn_params(self) -> int:
        q = self.heads * self.head_dim
        return self.hidden * q * 2 + self.hidden * self.kv_heads * self.head_dim * 2

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate * self.layers

    @property
    def forward_params(self) -> int:
        return self.layers * self.attn_params + self.mlp_params + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.forward_params + self.vocab * self.hidden  # untied embedding table

    def forward_flops(self, seq_len: int) -> float:
        """FLOPs per token of one forward (weights and causal attention scores)."""
        return 2 * self.forward_params + 2 * self.layers * seq_len * self.heads * self.head_dim


PAPER = [
    Arch("Qwen2.5-7B", 3584, 28, 18944, 28, 4, 128, 152064),
    Arch("Llama-3-8B", 4096, 32, 14336, 32, 8, 128, 128256),
    Arch("Mistral-Nemo-12B", 5120, 40, 14336, 32, 8, 128, 131072),
    Arch("Llama-3-70B", 8192, 80, 28672, 64, 8, 128, 128256),
]
# Dense bfloat16 tensor-core peaks (vendor data sheets), FLOP/s, and memory per GPU. The H100 SXM
# and the H200 share the die and its peak; the H200 has more memory (and bandwidth).
DEVICES = {"A100-80GB": (312e12, 80e9), "H100-SXM / H200": (989e12, 80e9)}
# Per stage: MFU against the matmul peak measured in the same run (MEASURED_PEAK_TFLOPS), from the
# run that measured every stage (bench/gpu_passes.py --stages lens patching on an H200, Llama-3-8B's
# shape, 2026-12-04; its NLL, FP + quantized and compare-job figures are the lowest of the runs).
# score_fp and restore_layers: the NLL pass (score_fp's residual hooks not measured there);
# quantize: the compare job's (not measured; < 1% of the FLOPs).
MEASURED = {
    "quantize": 0.555,
    "score_fp": 0.601,
    "compare_to_fp": 0.555,
    "logit_lens": 0.492,
    "restore_layers": 0.601,
    "patch_activations": 0.603,
}
MEASURED_PEAK_TFLOPS = 773.6
DATA_SHEET_TFLOPS = 989.0  # the H200's (and H100 SXM's) dense bf16 peak, which the measured peak is a share of


def measured_mfu(stage: str) -> float:
    """The stage's measured MFU as a fraction of the data-sheet peak."""
    return MEASURED[stage] * MEASURED_PEAK_TFLOPS / DATA_SHEET_TFLOPS


def stage_flops(a: Arch, tokens: int, selected: int, methods: int, patched: int, seq_len: int,
                lens_layers: int, n_cal: int) -> dict[str, float]:
    f = a.forward_flops(seq_len)
    head_share = a.vocab * a.hidden / a.forward_params
    # Paper-style patching: 4 sites on the upper half + every layer, one at a time (a patch at
    # layer l runs layers l…L−1 and the head).
    sweep = sum((a.layers - layer) / a.layers * (1 - head_share) + head_share for layer in range(a.layers))
    patches = 4 * (sweep + 0.5 + head_share)
    return {
        "quantize": methods * n_cal * seq_len * f * 2,
        "score_fp": tokens * f,
        "compare_to_fp": methods * tokens * (2 * f + 2 * a.mlp_params),
        "logit_lens": (methods + 1) * selected * (f + lens_layers * 2 * a.vocab * a.hidden),
        "restore_layers": methods * selected * f,
        "patch_activations": patched * selected * f * (2 + patches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, help="one fraction of the data-sheet peak for every stage "
                        "(default: each stage's, measured on an H200)")
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", type=int, default=8)
    parser.add_argument("--patched", type=int, default=2)
    parser.add_argument("--selected-fraction", type=float, default=0.2, help="|D_large ∪ D_ctrl| / examples")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the SLURM cluster")
    args = parser.parse_args()

    tokens = args.examples * args.seq_len
    selected = int(tokens * args.selected_fraction)
    print(f"paper setup: {args.examples} × {args.seq_len} tokens per model, {args.methods} methods, "
          f"{args.patched} patched, |D_large ∪ D_ctrl| = {args.selected_fraction:.0%}")
    mfu = {stage: args.mfu or measured_mfu(stage) for stage in MEASURED}
    print("MFU of the data-sheet peak: " + ", ".join(f"{stage} {value:.1%}" for stage, value in mfu.items()))
    print(f"{'model':<18}{'params':>8}{'PFLOP':>9}" + "".join(f"{d + ' h':>20}" for d in DEVICES)
          + f"{'weights×2 GB':>14}{f'{args.gpus}×H100 h':>12}")
    total = {d: 0.0 for d in DEVICES}
    for a in PAPER:
        flops = stage_flops(a, tokens, selected, args.methods, args.patched, args.seq_len, a.layers, args.calibration)
        pflop = sum(flops.values()) / 1e15
        seconds = {stage: value / mfu[stage] for stage, value in flops.items()}  # × 1/peak: FLOP-seconds
        hours = {d: sum(seconds.values()) / peak / 3600 for d, (peak, _) in DEVICES.items()}
        for d in DEVICES:
            total[d] += hours[d]
        pair_gb = 2 * a.total_params * 2 / 1e9
        # On the cluster each job gets a GPU: the longest chain is one method's quantize → compare →
        # lens → restore → patching (one job each), after score_fp; the rest spreads over the GPUs.
        h100 = DEVICES["H100-SXM / H200"][0]
        m = args.methods
        chain = (
            seconds["quantize"] / m + seconds["score_fp"] + seconds["compare_to_fp"] / m + seconds["logit_lens"] / (m + 1)
            + seconds["restore_layers"] / m + seconds["patch_activations"] / max(args.patched, 1)
        ) / h100
        spread = sum(seconds.values()) / h100 / args.gpus
        cluster = max(chain, spread) / 3600
        print(f"{a.name:<18}{a.total_params / 1e9:>7.1f}B{pflop:>9.0f}"
              + "".join(f"{hours[d]:>20.1f}" for d in DEVICES) + f"{pair_gb:>14.0f}{cluster:>12.1f}")
        shares = ", ".join(f"{k} {v / sum(flops.values()):.0%}" for k, v in flops.items())
        print(f"{'':<18}stages: {shares}")
    print("all four models: " + ", ".join(f"{d} {h:.0f} h on one GPU" for d, h in total.items()))


if __name__ == "__main__":
    main()
