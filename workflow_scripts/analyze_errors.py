"""Rule analyze_errors: correlations, overlap, D_large/D_ctrl and breaking_examples.md of one model."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import analyze_errors_job, run_job  # noqa: E402

run_job(
    analyze_errors_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    errors=snakemake.input.errors,  # noqa: F821
    kl=dict(zip(snakemake.params.methods, snakemake.input.kl, strict=True)),  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    analysis=dict(snakemake.params.analysis),  # noqa: F821
    correlations=snakemake.output.correlations,  # noqa: F821
    summary=snakemake.output.summary,  # noqa: F821
    overlap=snakemake.output.overlap,  # noqa: F821
    selection=snakemake.output.selection,  # noqa: F821
    breaking=snakemake.output.breaking,  # noqa: F821
    breaking_html=snakemake.output.breaking_html,  # noqa: F821
    note=snakemake.params.note,  # noqa: F821
)
