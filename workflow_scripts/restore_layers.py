"""Rule restore_layers: the quantized model with late layers restored to FP, on D_large and D_ctrl."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import restore_job, run_job  # noqa: E402

run_job(
    restore_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    method=snakemake.wildcards.method,  # noqa: F821
    fp_dir=snakemake.input.fp,  # noqa: F821
    q_dir=snakemake.input.model,  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    selection=snakemake.input.selection,  # noqa: F821
    output=snakemake.output[0],  # noqa: F821
    runtime=dict(snakemake.params.runtime),  # noqa: F821
    ranges=snakemake.params.ranges,  # noqa: F821
    trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
)
