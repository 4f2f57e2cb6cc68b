"""Rule score_model: the FP model once per batch and every method beside it → the FP NLL, residual
statistics and per-dimension |r|, γ; each method's NLL, KL, residuals and amplification."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

from qbreak.jobs import run_job, score_model_job  # noqa: E402

out = snakemake.output  # noqa: F821
methods = snakemake.params.methods  # noqa: F821
run_job(
    score_model_job,
    threads=snakemake.threads,  # noqa: F821
    model_name=snakemake.wildcards.model,  # noqa: F821
    fp_dir=snakemake.input.fp,  # noqa: F821
    examples=snakemake.input.examples,  # noqa: F821
    runtime=dict(snakemake.params.runtime),  # noqa: F821
    topk=snakemake.params.topk,  # noqa: F821
    fp_outputs={"nll": out.fp_nll, "residuals": out.fp_residuals, "dims": out.dims},
    quantized=dict(zip(methods, snakemake.input.quantized, strict=True)),  # noqa: F821
    outputs={
        method: {"nll": out.nll[i], "kl": out.kl[i], "residuals": out.residuals[i], "amplification": out.amplification[i]}
        for i, method in enumerate(methods)
    },
    trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
)
