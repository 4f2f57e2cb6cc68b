"""Rule collect_errors: per-example error NLL_q - NLL_fp of every method, one tidy table."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import errors_job, run_job  # noqa: E402

run_job(
    errors_job,
    threads=snakemake.threads,  # noqa: F821
    fp=snakemake.input.fp,  # noqa: F821
    nll=dict(zip(snakemake.params.methods, snakemake.input.nll, strict=False)),  # noqa: F821
    methods={k: dict(v) for k, v in snakemake.params.methods.items()},  # noqa: F821
    output=snakemake.output[0],  # noqa: F821
)
