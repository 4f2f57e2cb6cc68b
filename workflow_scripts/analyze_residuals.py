"""Rule analyze_residuals: the per-layer residual findings of one model, as tidy tables."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import analyze_residuals_job, run_job  # noqa: E402

inp, methods = snakemake.input, snakemake.params.methods  # noqa: F821
run_job(
    analyze_residuals_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    errors=inp.errors,
    selection=inp.selection,
    residuals_fp=inp.residuals_fp,
    dims=inp.dims,
    amplification=dict(zip(methods, inp.amplification, strict=True)),
    lens=dict(zip(["fp", *methods], inp.lens, strict=True)),
    restore=dict(zip(methods, inp.restore, strict=True)),
    nll=dict(zip(["fp", *methods], inp.nll, strict=True)),
    settings=dict(snakemake.params.settings),  # noqa: F821
    outputs=dict(snakemake.output.items()),  # noqa: F821
)
