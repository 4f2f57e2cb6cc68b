"""Rule make_calibration: tokenize a method's own calibration corpus (e.g. C4 for GPTQ)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import make_calibration_job, run_job  # noqa: E402

run_job(
    make_calibration_job,
    threads=snakemake.threads,  # noqa: F821
    corpus=dict(snakemake.params.corpus),  # noqa: F821
    model_spec=dict(snakemake.params.spec),  # noqa: F821
    model_key=f"models.{snakemake.wildcards.model}",  # noqa: F821
    model_dir=snakemake.input.model,  # noqa: F821
    calibration=snakemake.output.calibration,  # noqa: F821
)
