"""Rule summarize_patching: the Table-4 layout (Arrow, markdown) and the patching figures."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import run_job, summarize_patching_job  # noqa: E402

out = snakemake.output  # noqa: F821
run_job(
    summarize_patching_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    patching=dict(zip(snakemake.params.methods, snakemake.input.patching, strict=True)),  # noqa: F821
    nll_fp=snakemake.input.nll_fp,  # noqa: F821
    selection=snakemake.input.selection,  # noqa: F821
    table=out.table,
    markdown=out.markdown,
    html=out.html,
    figures={
        "patching_sites": {"png": out.sites_png, "svg": out.sites_svg},
        "patching_sweep": {"png": out.sweep_png, "svg": out.sweep_svg},
    },
    note=snakemake.params.note,  # noqa: F821
)
