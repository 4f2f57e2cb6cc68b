"""Rule fetch_model: materialize one configured model as a safetensors folder."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import fetch_model_job, run_job  # noqa: E402

run_job(
    fetch_model_job,
    threads=snakemake.threads,  # noqa: F821
    name=snakemake.wildcards.model,  # noqa: F821
    spec=dict(snakemake.params.spec),  # noqa: F821
    output=snakemake.output[0],  # noqa: F821
)
