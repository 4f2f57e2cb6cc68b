# The model passes over the evaluation examples. Each pass yields every per-example statistic at
# once (NLL, KL, residual statistics, MLP error amplification) instead of re-running the model per
# statistic. passes.fuse_methods: one job per model with the FP model once per batch and every
# method beside it (score_model), or one FP job and one side-by-side FP + quantized job per method
# (score_fp, compare_to_fp), which spread over nodes and hold two models each.


if config["passes"]["fuse_methods"]:

    rule score_model:
        input:
            fp="results/models/{model}/fp",
            quantized=expand("results/models/{{model}}/{method}", method=QUANTIZED),
            examples=examples_file,
        output:
            fp_nll="results/nll/{model}/fp.arrow",
            fp_residuals="results/residuals/{model}/fp.arrow",
            dims="results/residuals/{model}/fp_dims.arrow",
            nll=expand("results/nll/{{model}}/{method}.arrow", method=QUANTIZED),
            kl=expand("results/kl/{{model}}/{method}.arrow", method=QUANTIZED),
            residuals=expand(
                "results/residuals/{{model}}/{method}.arrow", method=QUANTIZED
            ),
            amplification=expand(
                "results/amplification/{{model}}/{method}.arrow", method=QUANTIZED
            ),
        log:
            "logs/score_model/{model}.log",
        benchmark:
            "benchmarks/score_model/{model}.tsv"
        conda:
            "../envs/models.yaml"
        # Scaled down to --cores; one model pass at a time uses every core without oversubscribing.
        threads: 8
        resources:
            # every model at once (measured on the bundled model: peak RSS in benchmarks/)
            mem_mb=mem_mb(1 + len(QUANTIZED), 7000),
            gpu=GPU,
        params:
            methods=QUANTIZED,
            runtime=config["runtime"],
            topk=config["kl"]["topk"],
            trust_remote_code=trust_remote_code,
            code=CODE["model_pass"],
        script:
            "../workflow_scripts/score_model.py"

else:

    rule score_fp:
        input:
            model="results/models/{model}/fp",
            examples=examples_file,
        output:
            nll="results/nll/{model}/fp.arrow",
            residuals="results/residuals/{model}/fp.arrow",
            dims="results/residuals/{model}/fp_dims.arrow",
        log:
            "logs/score_fp/{model}.log",
        benchmark:
            "benchmarks/score_fp/{model}.tsv"
        conda:
            "../envs/models.yaml"
        # Scaled down to --cores; one model pass at a time uses every core without oversubscribing.
        threads: 8
        resources:
            mem_mb=mem_mb(1, 3500),
            gpu=GPU,
        params:
            runtime=config["runtime"],
            trust_remote_code=trust_remote_code,
            code=CODE["fp_pass"],
        script:
            "../workflow_scripts/score_fp.py"

    rule compare_to_fp:
        input:
            fp="results/models/{model}/fp",
            model=model_dir,
            examples=examples_file,
        output:
            nll="results/nll/{model}/{method}.arrow",
            kl="results/kl/{model}/{method}.arrow",
            residuals="results/residuals/{model}/{method}.arrow",
            amplification="results/amplification/{model}/{method}.arrow",
        log:
            "logs/compare_to_fp/{model}/{method}.log",
        benchmark:
            "benchmarks/compare_to_fp/{model}/{method}.tsv"
        wildcard_constraints:
            method=_alternatives(QUANTIZED) or "(?!)",
        conda:
            "../envs/models.yaml"
        threads: 8
        resources:
            mem_mb=mem_mb(2, 7000),
            gpu=GPU,
        params:
            runtime=config["runtime"],
            topk=config["kl"]["topk"],
            trust_remote_code=trust_remote_code,
            code=CODE["compare"],
        script:
            "../workflow_scripts/compare_to_fp.py"


rule store_fp_topk:
    input:
        model="results/models/{model}/fp",
        examples=examples_file,
    output:
        "results/kl/{model}/fp_topk.arrow",
    log:
        "logs/store_fp_topk/{model}.log",
    benchmark:
        "benchmarks/store_fp_topk/{model}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb(1, 3500),
        gpu=GPU,
    params:
        runtime=config["runtime"],
        topk=config["kl"]["topk"],
        trust_remote_code=trust_remote_code,
        code=CODE["topk"],
    script:
        "../workflow_scripts/store_fp_topk.py"
