"""Rule plot_errors: correlation heatmap, error scatter and error distributions of one model."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import plot_errors_job, run_job  # noqa: E402

out = snakemake.output  # noqa: F821
run_job(
    plot_errors_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    errors=snakemake.input.errors,  # noqa: F821
    correlations=snakemake.input.correlations,  # noqa: F821
    heatmap={"png": out.heatmap_png, "svg": out.heatmap_svg},
    scatter={"png": out.scatter_png, "svg": out.scatter_svg},
    distributions={"png": out.distributions_png, "svg": out.distributions_svg},
)
