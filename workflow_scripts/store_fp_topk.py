"""Rule store_fp_topk: the FP model's top-k log-probs per token, a reference for KL without FP."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import fp_topk_job, run_job  # noqa: E402

run_job(
    fp_topk_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    model_dir=snakemake.input.model,  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    output=snakemake.output[0],  # noqa: F821
    runtime=dict(snakemake.params.runtime),  # noqa: F821
    topk=snakemake.params.topk,  # noqa: F821
    trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
)
