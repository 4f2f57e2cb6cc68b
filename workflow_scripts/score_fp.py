"""Rule score_fp: one FP pass → per-example NLL, residual statistics, per-dimension |r| and γ."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import fp_pass_job, run_job  # noqa: E402

run_job(
    fp_pass_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    model_dir=snakemake.input.model,  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    nll_output=snakemake.output.nll,  # noqa: F821
    residuals_output=snakemake.output.residuals,  # noqa: F821
    dims_output=snakemake.output.dims,  # noqa: F821
    runtime=dict(snakemake.params.runtime),  # noqa: F821
    trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
)
