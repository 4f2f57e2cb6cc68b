"""Rule compare_to_fp: FP and one quantized model side by side → NLL, KL, residuals, amplification."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import compare_job, run_job  # noqa: E402

run_job(
    compare_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    method=snakemake.wildcards.method,  # noqa: F821
    fp_dir=snakemake.input.fp,  # noqa: F821
    q_dir=snakemake.input.model,  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    nll_output=snakemake.output.nll,  # noqa: F821
    kl_output=snakemake.output.kl,  # noqa: F821
    residuals_output=snakemake.output.residuals,  # noqa: F821
    amplification_output=snakemake.output.amplification,  # noqa: F821
    runtime=dict(snakemake.params.runtime),  # noqa: F821
    topk=snakemake.params.topk,  # noqa: F821
    trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
)
