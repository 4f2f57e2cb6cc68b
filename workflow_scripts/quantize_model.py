"""Rule quantize_model: one configured method applied to the FP model, saved dequantized."""

import sys

# llm-compressor logs to stdout (hundreds of lines per GPTQ or AWQ run): into the job's log as well
sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import quantize_job, run_job  # noqa: E402

run_job(
    quantize_job,
    threads=snakemake.threads,  # noqa: F821
    method=snakemake.wildcards.method,  # noqa: F821
    entry=dict(snakemake.params.entry),  # noqa: F821
    model_dir=snakemake.input.model,  # noqa: F821
    calibration=snakemake.input.get("calibration") or None,  # noqa: F821 (none for data-free methods)
    output=snakemake.output[0],  # noqa: F821
    device=snakemake.params.device,  # noqa: F821
)
