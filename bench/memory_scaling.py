"""Peak memory of every model stage at n examples and 8·n examples, side by side in one run.

No stage stores full activations or full-vocabulary logits for the corpus: per batch, hooks reduce
activations to per-example numbers, and logits exist one block at a time. So a stage's peak RSS
should not grow with the number of examples (goal: ratio ≤ 1.2). Each stage runs its real job
function (`qbreak.jobs`) in a fresh process; the child's peak RSS (`resource.getrusage`) is read,
and the wall seconds of the whole process (imports and model loading included) are printed. So is
its peak virtual size (`VmPeak`, Linux): a heap that fragments grows its address range with every
batch even while trimming keeps the RSS flat (see qbreak/columns.py), and that shows here first.

    .venv/bin/python bench/memory_scaling.py --n 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

RUNTIME = {"device": "cpu", "dtype": "float32", "batch_size": 8}
STAGES = ("score_model", "score_fp", "compare_to_fp", "logit_lens", "restore_layers", "patch_activations")


def child(stage: str, work: Path, fp: str, q: str, examples: str, selection: str) -> None:
    """Run one stage's job function on the given files (in this fresh process)."""
    from qbreak import jobs
    from qbreak.runtime import configure

    configure(int(json.loads((work / "threads.json").read_text())))
    out = work / stage
    out.mkdir(exist_ok=True)
    if stage == "score_model":  # FP and two methods side by side (the quantized folder twice)
        jobs.score_model_job(
            "m", fp, examples, RUNTIME, topk=32, fp_outputs={n: str(out / f"fp_{n}.arrow") for n in jobs.FP_OUTPUTS},
            quantized={"q1": q, "q2": q},
            outputs={m: {n: str(out / f"{m}_{n}.arrow") for n in jobs.METHOD_OUTPUTS} for m in ("q1", "q2")},
        )
    elif stage == "score_fp":
        jobs.fp_pass_job("m", fp, examples, str(out / "nll.arrow"), str(out / "res.arrow"), str(out / "dims.arrow"), RUNTIME)
    elif stage == "compare_to_fp":
        jobs.compare_job("m", "q", fp, q, examples, str(out / "nll.arrow"), str(out / "kl.arrow"),
                         str(out / "res.arrow"), str(out / "amp.arrow"), RUNTIME, topk=32)
    elif stage == "logit_lens":
        jobs.lens_job("m", "q", q, examples, selection, str(out / "lens.arrow"), RUNTIME, [5, 15, 29])
    elif stage == "restore_layers":
        jobs.restore_job("m", "q", fp, q, examples, selection, str(out / "restore.arrow"), RUNTIME, [[23, 29]])
    elif stage == "patch_activations":
        settings = {"sites": ["attn", "down", "resid"], "sweep_layers": [20], "weight_sites": ["gate_weights"]}
        jobs.patch_job("m", "q", "rtn", fp, q, examples, selection, str(out / "patch.arrow"), RUNTIME, settings)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    vm_peak = int(status["VmPeak"].split()[0]) / 1024 if "VmPeak" in status else float("nan")
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vm_peak_mb": vm_peak}))


def subset(examples: str, n: int, dest: Path) -> tuple[str, str]:
    """The first n examples, and a selection marking every one as D_large or D_ctrl (so the
    selected-example stages also see all n)."""
    from qbreak.io import EXAMPLES_SCHEMA, SELECTION_SCHEMA, read_table, write_table

    table = read_table(examples, EXAMPLES_SCHEMA)
    if table.num_rows < n:
        raise SystemExit(f"{examples}: {table.num_rows} examples, {n} needed")
    table = table.slice(0, n)
    ids = table.column("example_id").to_pylist()
    selection = pa.table(
        {
            "example_id": ids,
            "model": ["m"] * n,
            "set": ["large" if i % 2 == 0 else "ctrl" for i in range(n)],
            "mean_error": [0.0] * n,
            "rank": list(range(1, n + 1)),
            "duplicate_of": [None] * n,
            "similarity": [None] * n,
        },
        schema=SELECTION_SCHEMA,
    )
    write_table(table, str(dest / f"examples_{n}.arrow"), EXAMPLES_SCHEMA)
    write_table(selection, str(dest / f"selection_{n}.arrow"), SELECTION_SCHEMA)
    return str(dest / f"examples_{n}.arrow"), str(dest / f"selection_{n}.arrow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m/fp")
    parser.add_argument("--examples", default="results/corpus/wikipedia-vital/smollm2-135m/examples.arrow")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, work, fp, q, examples, selection = args.child
        child(stage, Path(work), fp, q, examples, selection)
        return

    from qbreak.quantize.run import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "threads.json").write_text(json.dumps(args.threads))
        q_dir = work / "rtn-w3"
        quantize_model("rtn-w3", {"kind": "rtn", "bits": 3, "group_size": 64}, args.model, None, q_dir)
        sizes = (args.n, 8 * args.n)
        files = {n: subset(args.examples, n, work) for n in sizes}
        print(f"peak RSS per stage (MB), {sizes[0]} vs {sizes[1]} examples of the bundled model, threads {args.threads}")
        print(f"{'stage':<20}{sizes[0]:>10}{sizes[1]:>10}{'ratio':>8}{'seconds':>16}{'VmPeak':>20}{'ratio':>8}")
        for stage in args.stages:
            peaks, virtual, seconds = [], [], []
            for n in sizes:
                start = time.perf_counter()
                examples, selection = files[n]
                command = [sys.executable, __file__, "--child", stage, str(work), args.model, str(q_dir), examples, selection]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{stage} with {n} examples failed:\n{done.stderr[-3000:]}")
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                peaks.append(measured["max_rss_mb"])
                virtual.append(measured["vm_peak_mb"])
                seconds.append(time.perf_counter() - start)
            print(f"{stage:<20}{peaks[0]:>10.0f}{peaks[1]:>10.0f}{peaks[1] / peaks[0]:>8.2f}"
                  f"{seconds[0]:>8.1f}{seconds[1]:>8.1f}{virtual[0]:>10.0f}{virtual[1]:>10.0f}{virtual[1] / virtual[0]:>8.2f}")


if __name__ == "__main__":
    main()
