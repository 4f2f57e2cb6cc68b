#!/usr/bin/env python
"""Cross-check qbreak's GPTQ numbers against the GPTQModel library (CPU only).

Quantizes the full-precision model with GPTQModel (W3, group 64, asymmetric,
desc_act=False, damp_percent=0.01) on the first N calibration rows, then scores
perplexity = exp(mean token NLL) on the first N evaluation examples, positions
1..L-1 (position 0, id 0, is never scored), for both the FP model and the
quantized model (GPTQModel's own dequantized weights, from its CPU torch
kernel, placed into the float32 model: that kernel itself only runs fp16/bf16).

Two GPTQModel defaults differ from llm-compressor (qbreak's GPTQ, bench/gptq_crosscheck.py):

- true_sequential=True: within a decoder layer the subsets [q,k,v] -> [o] -> [gate,up] -> [down]
  are quantized in turn and each later subset's Hessian is taken with the earlier ones already
  quantized. llm-compressor's default takes all seven Hessians in one full-precision pass of the
  layer (= --no-true-sequential here); its oneshot(sequential_targets=["re:.*_proj$"]) (that
  bench's --per-linear) is the true-sequential counterpart.
- static_groups=False: each group's scale/zero is chosen when GPTQ reaches the group's first
  column, from the already error-updated weights. llm-compressor chooses them from the original
  weights before GPTQ starts (= --static-groups here).

Not part of the project's dependencies: run it in a scratch venv, e.g.

    python3 -m venv /tmp/gptqm_venv
    /tmp/gptqm_venv/bin/pip install torch==2.13.0            # first: the local CPU wheel
    echo "torch==2.13.0+cpu" > /tmp/gptqm_constraints.txt      # keep pip from replacing it
    /tmp/gptqm_venv/bin/pip install -c /tmp/gptqm_constraints.txt gptqmodel==7.6.0 transformers==5.17.0 pyarrow

and from the repository root (one CPU worker, one thread):

    export GPTQMODEL_CPU_WORKERS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    /tmp/gptqm_venv/bin/python bench/gptq_crosscheck_gptqmodel.py                    # GPTQModel defaults
    /tmp/gptqm_venv/bin/python bench/gptq_crosscheck_gptqmodel.py --static-groups --no-true-sequential
    /tmp/gptqm_venv/bin/python bench/gptq_crosscheck_gptqmodel.py --static-groups

Measured 2026-12-02 (smollm2-135m, first 64 evaluation / 64 calibration examples, FP 14.05, one
thread, GPTQModel 7.6.0, quantize seconds): defaults 32.52 (250 s); --static-groups 33.74 (300 s);
--static-groups --no-true-sequential 35.45 (208 s), against llm-compressor's default 35.54.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pyarrow.ipc as ipc  # noqa: E402
import torch  # noqa: E402

CORPUS = "results/corpus/wikipedia-vital/smollm2-135m"  # run from the repository root


def read_ids(path: str, n: int) -> torch.Tensor:
    table = ipc.open_file(path).read_all()
    rows = table.column("input_ids").to_pylist()[:n]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """exp(mean over examples of mean NLL of positions 1..L-1)."""
    model.eval()
    per_example = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
        logits = out.logits[:, :-1, :].float()
        target = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(target.shape)
        per_example.extend(nll.mean(dim=1).tolist())
    return math.exp(sum(per_example) / len(per_example))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="results/models/smollm2-135m/fp")
    ap.add_argument("--examples", default=f"{CORPUS}/examples.arrow")
    ap.add_argument("--calibration", default=f"{CORPUS}/calibration.arrow")
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp-percent", type=float, default=0.01)
    ap.add_argument(
        "--act-group-aware", action="store_true",
        help="GPTQModel's default for GPTQ is act_group_aware=True (a GPTQModel-specific "
             "reordering); off by default here to match vanilla GPTQ with desc_act=False",
    )
    ap.add_argument("--static-groups", action="store_true",
                    help="QuantizeConfig(static_groups=True): group scale/zero from the original weights "
                         "(as llm-compressor does); GPTQModel's default picks them during GPTQ")
    ap.add_argument("--no-true-sequential", action="store_true",
                    help="QuantizeConfig(true_sequential=False): all Hessians of a decoder layer from one "
                         "full-precision pass (as llm-compressor's default per-layer pipeline)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=None, help="where to save the quantized model (default: temp dir)")
    ap.add_argument("--skip-quantize", action="store_true",
                    help="reuse an existing quantized checkpoint in --out-dir")
    ap.add_argument("--json", default=None, help="optional path for a JSON result record")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # gptqmodel 7.6 hard-codes a 2-worker "model_loader:cpu" sub-pool, and the
    # pool refuses it when the parent "cpu" pool has 1 worker (the default on a
    # 2-core machine, or GPTQMODEL_CPU_WORKERS=1):
    #   ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1
    # Build the pool ourselves with the sub-pool capped at the parent's size.
    from gptqmodel.utils.threadx import DeviceThreadPool, WarmUpCtx, WarmupTask
    from gptqmodel.utils.linalg_warmup import run_torch_linalg_warmup

    def _build_pool():
        cpu_workers = gptqmodel._default_cpu_workers()
        return DeviceThreadPool(
            inference_mode=True,
            warmups={"cpu": WarmupTask(run_torch_linalg_warmup, scope=WarmUpCtx.THREAD_AND_DEVICE)},
            workers={"cpu": cpu_workers, "model_loader:cpu": min(2, cpu_workers)},
            empty_cache_every_n=512,
        )

    if getattr(gptqmodel, "_DEVICE_THREAD_POOL", None) is None and hasattr(gptqmodel, "_build_device_thread_pool"):
        gptqmodel._build_device_thread_pool = _build_pool
    import transformers
    from transformers import AutoModelForCausalLM

    eval_ids = read_ids(args.examples, args.n_eval)
    calib_ids = read_ids(args.calibration, args.n_calib)
    assert (eval_ids[:, 0] == 0).all() and (calib_ids[:, 0] == 0).all()
    calibration = [
        {"input_ids": row.tolist(), "attention_mask": [1] * row.shape[0]} for row in calib_ids
    ]

    t0 = time.perf_counter()
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    fp_ppl = perplexity(fp, eval_ids, args.batch_size)
    t_fp = time.perf_counter() - t0
    print(f"FP ppl: {fp_ppl:.4f}  ({t_fp:.1f}s)", flush=True)

    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=False,
        desc_act=False,
        act_group_aware=args.act_group_aware,
        damp_percent=args.damp_percent,
        static_groups=args.static_groups,
        true_sequential=not args.no_true_sequential,
        device="cpu",
        offload_to_disk=False,
    )
    print(f"quantize config: {qcfg}", flush=True)
    print(f"settings: W{args.bits} g{args.group_size} sym=False desc_act=False "
          f"act_group_aware={qcfg.act_group_aware} damp_percent={qcfg.damp_percent} "
          f"static_groups={qcfg.static_groups} true_sequential={qcfg.true_sequential} "
          f"n_calib={args.n_calib} n_eval={args.n_eval} threads={torch.get_num_threads()} "
          f"GPTQMODEL_CPU_WORKERS={os.environ.get('GPTQMODEL_CPU_WORKERS')}", flush=True)

    tmp = None
    out_dir = args.out_dir
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gptqmodel-w3-")
        out_dir = tmp.name

    t1 = time.perf_counter()
    if args.skip_quantize:
        t_quant = float("nan")
        print(f"reusing quantized checkpoint in {out_dir}", flush=True)
    else:
        model = GPTQModel.load(args.model, qcfg, dtype=torch.float32)  # qcfg.device="cpu"
        model.quantize(calibration, batch_size=1, calibration_sort=None)
        t_quant = time.perf_counter() - t1
        model.save(out_dir)
        del model
        print(f"quantized + saved in {t_quant:.1f}s -> {out_dir}", flush=True)

    # GPTQModel's CPU torch kernel (TorchLinear) only accepts fp16/bf16
    # activations ("only supports `[torch.float16, torch.bfloat16]` dtype"), so
    # load the checkpoint with that kernel in fp16, take its own dequantized
    # weights (TorchLinear.dequantize_weight, i.e. scale * (q - zero) per group)
    # and put them, as float32, into the float32 FP model. The evaluation then
    # differs from the FP one only in the quantized Linear weights.
    t2 = time.perf_counter()
    qmodel = GPTQModel.load(out_dir, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    inner = qmodel.model
    fp_modules = dict(fp.named_modules())
    kernels, n_replaced, max_rel_err = set(), 0, 0.0
    with torch.no_grad():
        for name, mod in inner.named_modules():
            if not hasattr(mod, "dequantize_weight") or not hasattr(mod, "qweight"):
                continue
            kernels.add(type(mod).__name__)
            dense = mod.dequantize_weight().T.to(torch.float32)  # [out, in]
            target = fp_modules[name]
            assert target.weight.shape == dense.shape, (name, target.weight.shape, dense.shape)
            rel = ((dense - target.weight).norm() / target.weight.norm()).item()
            max_rel_err = max(max_rel_err, rel)
            target.weight.copy_(dense)
            n_replaced += 1
    kernels = sorted(kernels)
    print(f"replaced {n_replaced} Linear weights with dequantized ones; "
          f"max relative Frobenius weight error {max_rel_err:.4f}", flush=True)
    del qmodel, inner
    q_ppl = perplexity(fp, eval_ids, args.batch_size)
    t_qeval = time.perf_counter() - t2
    total = time.perf_counter() - t0

    label = (f"gptqmodel W{args.bits} g{args.group_size} static_groups={qcfg.static_groups} "
             f"true_sequential={qcfg.true_sequential}")
    print(f"kernels: {kernels}")
    print(f"FP ppl: {fp_ppl:.4f}")
    print(f"{label} ppl: {q_ppl:.4f}")
    print(f"seconds: total {total:.1f} (fp eval {t_fp:.1f}, quantize {t_quant:.1f}, load+eval {t_qeval:.1f})")

    if args.json:
        record = {
            "fp_ppl": fp_ppl,
            "q_ppl": q_ppl,
            "bits": args.bits,
            "group_size": args.group_size,
            "sym": False,
            "desc_act": False,
            "act_group_aware": args.act_group_aware,
            "damp_percent": args.damp_percent,
            "static_groups": qcfg.static_groups,
            "true_sequential": qcfg.true_sequential,
            "n_eval": args.n_eval,
            "n_calib": args.n_calib,
            "kernels": kernels,
            "n_linear_replaced": n_replaced,
            "max_rel_weight_err": max_rel_err,
            "seconds": {"total": total, "fp_eval": t_fp, "quantize": t_quant, "q_load_eval": t_qeval},
            "versions": {
                "gptqmodel": gptqmodel.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
