"""Rule make_examples: tokenize the corpus into evaluation and calibration examples."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import make_examples_job, run_job  # noqa: E402

run_job(
    make_examples_job,
    threads=snakemake.threads,  # noqa: F821
    corpus=dict(snakemake.params.corpus),  # noqa: F821
    model_spec=dict(snakemake.params.spec),  # noqa: F821
    model_key=f"models.{snakemake.wildcards.model}",  # noqa: F821
    model_dir=snakemake.input.model,  # noqa: F821
    examples=snakemake.output.examples,  # noqa: F821
    calibration=snakemake.output.calibration,  # noqa: F821
)
