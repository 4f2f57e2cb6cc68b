"""Rule plot_residuals: the residual-stream figures of one model (PNG and SVG)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import plot_residuals_job, run_job  # noqa: E402

names = snakemake.params.names  # noqa: F821
paths = list(snakemake.output)  # noqa: F821
run_job(
    plot_residuals_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    inputs=dict(snakemake.input.items()),  # noqa: F821
    figures={name: {"png": paths[2 * k], "svg": paths[2 * k + 1]} for k, name in enumerate(names)},
)
