"""The model jobs end to end on a GPU: identities that must hold there, and agreement with the CPU.

CI has no GPU, so pytest does not collect this file; run it where a GPU is:

    PYTHONPATH=src python3 tests/gpu/check_jobs.py                    # cuda, bfloat16
    .venv/bin/python tests/gpu/check_jobs.py --device cpu --dtype float32   # smoke test here

A random model of SmolLM2-135M's architecture (the hubs are unreachable on the machines this project
measures on) and its real RTN W3 copy are saved as safetensors folders; the real job functions
(`jobs.fp_pass_job`, `jobs.compare_job`: load the folder, run the pass, write Arrow files) run on
the device in the given dtype and on the CPU in float32, and the library functions behind the
lens, restore and patching jobs run on the device. Checks (exit status 1 if any fails):
- device vs CPU float32: FP NLL and quantized NLL within `--tolerance` nats (bf16 rounding);
- on the device: KL ≥ 0; a model compared with itself has KL 0 and its own NLL; the fused model
  pass (`jobs.score_model_job`) gives the per-method jobs' NLLs and KLs; unpatched = the
  quantized NLL; the residual patched at every layer = FP (the paper's patch-all identity); the
  logit lens at the last layer = FP; every layer restored = FP.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_passes import build_model  # noqa: E402
from nll_throughput import rtn_copy  # noqa: E402

from qbreak.io import EXAMPLES_SCHEMA, KL_SCHEMA, NLL_SCHEMA, read_table, write_table  # noqa: E402
from qbreak.jobs import FP_OUTPUTS, METHOD_OUTPUTS, compare_job, fp_pass_job, score_model_job  # noqa: E402
from qbreak.lens import logit_lens, restore_table  # noqa: E402
from qbreak.models import load_model  # noqa: E402
from qbreak.patching import Patch, patching_table  # noqa: E402

failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if not ok:
        failures.append(name)


def examples_table(n: int, seq: int, vocab: int) -> pa.Table:
    rng = np.random.default_rng(0)
    rows = [[1, *rng.integers(2, vocab, size=seq - 1 - i % 5).tolist()] for i in range(n)]  # ragged: padding
    return pa.table(
        {
            "example_id": np.arange(n, dtype=np.int32), "doc_id": [str(i) for i in range(n)], "topic": [None] * n,
            "input_ids": rows, "n_tokens": [len(r) for r in rows], "text": [""] * n,
        },
        schema=EXAMPLES_SCHEMA,
    )


def run_jobs(root: Path, tag: str, runtime: dict[str, object]) -> dict[str, np.ndarray]:
    """fp_pass_job and compare_job (RTN copy, and FP against itself) into root/tag; their columns."""
    out = root / tag
    fp_pass_job("m", str(root / "fp"), str(root / "examples.arrow"), str(out / "fp_nll.arrow"),
                str(out / "fp_res.arrow"), str(out / "fp_dims.arrow"), runtime)
    for method, q_dir in (("rtn", root / "q"), ("self", root / "fp")):
        compare_job("m", method, str(root / "fp"), str(q_dir), str(root / "examples.arrow"),
                    str(out / f"{method}_nll.arrow"), str(out / f"{method}_kl.arrow"), str(out / f"{method}_res.arrow"),
                    str(out / f"{method}_amp.arrow"), runtime, topk=32)
    return _columns(out)


def run_fused(root: Path, tag: str, runtime: dict[str, object]) -> dict[str, np.ndarray]:
    """score_model_job (passes.fuse_methods: the FP model once per batch, RTN and FP itself beside
    it, one FP head for both KLs) into root/tag; the same columns as `run_jobs`."""
    out = root / tag
    score_model_job(
        "m", str(root / "fp"), str(root / "examples.arrow"), runtime, topk=32,
        fp_outputs={name: str(out / f"fp_{name}.arrow") for name in FP_OUTPUTS},
        quantized={"rtn": str(root / "q"), "self": str(root / "fp")},
        outputs={m: {name: str(out / f"{m}_{name}.arrow") for name in METHOD_OUTPUTS} for m in ("rtn", "self")},
    )
    return _columns(out)


def _columns(out: Path) -> dict[str, np.ndarray]:
    columns = {"fp": read_table(out / "fp_nll.arrow", NLL_SCHEMA).column("nll").to_numpy()}
    for method in ("rtn", "self"):
        columns[f"{method}_nll"] = read_table(out / f"{method}_nll.arrow", NLL_SCHEMA).column("nll").to_numpy()
        kl = read_table(out / f"{method}_kl.arrow", KL_SCHEMA)
        for name in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"):
            columns[f"{method}_{name}"] = kl.column(name).to_numpy()
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tolerance", type=float, default=0.05, help="device vs CPU float32, nats")
    parser.add_argument("--n-examples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(8, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fp = build_model("smollm2-135m", torch.float32, "cpu")
        fp.save_pretrained(root / "fp")
        rtn_copy(fp, bits=3).save_pretrained(root / "q")
        examples = examples_table(args.n_examples, 128, fp.config.vocab_size)
        write_table(examples, root / "examples.arrow", EXAMPLES_SCHEMA)

        cpu = run_jobs(root, "cpu", {"device": "cpu", "dtype": "float32", "batch_size": 8})
        dev = run_jobs(root, "device", {"device": args.device, "dtype": args.dtype, "batch_size": 8})
        for name in ("fp", "rtn_nll"):
            diff = np.abs(dev[name] - cpu[name]).max()
            check(f"{name} NLL, {args.device} {args.dtype} vs cpu float32", diff <= args.tolerance,
                  f"max |Δ| {diff:.2e} (mean NLL {cpu[name].mean():.3f})")
        kl_min = min(dev[f"rtn_{k}"].min() for k in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"))
        check("KL ≥ 0 and finite on the device", kl_min >= 0 and np.isfinite(dev["rtn_kl_fp_q"]).all(),
              f"min {kl_min:.2e}, mean KL(P_fp‖P_q) {dev['rtn_kl_fp_q'].mean():.4f} (cpu {cpu['rtn_kl_fp_q'].mean():.4f})")
        self_kl = max(dev[f"self_{k}"].max() for k in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"))
        check("a model against itself: KL 0", self_kl <= 1e-6, f"max {self_kl:.2e}")
        diff = np.abs(dev["self_nll"] - dev["fp"]).max()
        check("a model against itself: its own NLL", diff <= 1e-5, f"max |Δ| {diff:.2e}")
        fused = run_fused(root, "fused", {"device": args.device, "dtype": args.dtype, "batch_size": 8})
        diff = max(np.abs(fused[name] - dev[name]).max() for name in dev)
        check("fused model pass = FP job + one compare job per method", diff <= 1e-5,
              f"max |Δ| {diff:.2e} over {len(dev)} columns")

        dtype = getattr(torch, args.dtype)
        fp_dev = load_model(root / "fp", dtype=dtype, device=args.device)
        q_dev = load_model(root / "q", dtype=dtype, device=args.device)
        layers = fp_dev.config.num_hidden_layers
        patches = [Patch("none", (), "none"), Patch("resid", tuple(range(layers)), "all")]
        table = patching_table(fp_dev, q_dev, examples, "m", "rtn", patches, 8, args.device)
        by_site = {site: table.filter(pc.equal(table["site"], site)).column("nll").to_numpy()
                   for site in ("none", "resid")}
        diff = np.abs(by_site["none"] - dev["rtn_nll"]).max()
        check("patching: unpatched = quantized NLL", diff <= 1e-4, f"max |Δ| {diff:.2e}")
        diff = np.abs(by_site["resid"] - dev["fp"]).max()
        check("patching: residual patched at every layer = FP NLL", diff <= 1e-4, f"max |Δ| {diff:.2e}")
        lens = logit_lens(fp_dev, examples, "m", "fp", [layers - 1], 8, args.device).column("nll").to_numpy()
        diff = np.abs(lens - dev["fp"]).max()
        check("logit lens at the last layer = FP NLL", diff <= 1e-4, f"max |Δ| {diff:.2e}")
        restored = restore_table(q_dev, fp_dev, examples, "m", "rtn", {"all": list(range(layers))}, 8, args.device)
        diff = np.abs(restored.column("nll").to_numpy() - dev["fp"]).max()
        check("every layer restored = FP NLL", diff <= 1e-4, f"max |Δ| {diff:.2e}")
    print(f"{len(failures)} failed" if failures else "all passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
