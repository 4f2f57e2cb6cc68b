"""Rule report_overview: results/report/{model}/overview.html for `snakemake --report`."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import report_overview_job, run_job  # noqa: E402

inp = snakemake.input  # noqa: F821
run_job(
    report_overview_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    quantized=dict(zip(snakemake.params.methods, inp.quantized, strict=True)),  # noqa: F821
    tables={name: inp[name] for name in ("correlation_summary", "predictor", "restore_layers")},
    config_text=snakemake.params.config_text,  # noqa: F821
    overview=snakemake.output[0],  # noqa: F821
    note=snakemake.params.note,  # noqa: F821
)
