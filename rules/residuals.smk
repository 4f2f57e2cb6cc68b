# Residual-stream analysis on top of the model passes: logit lens and layer restoring on D_large and
# D_ctrl, then the per-layer findings and their figures.


rule logit_lens:
    input:
        model=model_dir,
        examples=examples_file,
        selection="results/analysis/{model}/selection.arrow",
    output:
        "results/lens/{model}/{method}.arrow",
    log:
        "logs/logit_lens/{model}/{method}.log",
    benchmark:
        "benchmarks/logit_lens/{model}/{method}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb(1, 3500),
        gpu=GPU,
    params:
        runtime=config["runtime"],
        layers=config["residuals"]["lens_layers"],
        trust_remote_code=trust_remote_code,
        code=CODE["lens"],
    script:
        "../workflow_scripts/logit_lens.py"


rule restore_layers:
    input:
        fp="results/models/{model}/fp",
        model=model_dir,
        examples=examples_file,
        selection="results/analysis/{model}/selection.arrow",
    output:
        "results/restore/{model}/{method}.arrow",
    log:
        "logs/restore_layers/{model}/{method}.log",
    benchmark:
        "benchmarks/restore_layers/{model}/{method}.tsv"
    wildcard_constraints:
        method=_alternatives(QUANTIZED) or "(?!)",
    conda:
        "../envs/models.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb(2, 5000),
        gpu=GPU,
    params:
        runtime=config["runtime"],
        ranges=config["residuals"]["restore_ranges"],
        trust_remote_code=trust_remote_code,
        code=CODE["restore"],
    script:
        "../workflow_scripts/restore_layers.py"


rule analyze_residuals:
    input:
        unpack(residual_analysis_inputs),
    output:
        norm_error_corr="results/analysis/{model}/norm_error_corr.arrow",
        amplification="results/analysis/{model}/amplification.arrow",
        gamma_outliers="results/analysis/{model}/gamma_outliers.arrow",
        logit_lens="results/analysis/{model}/logit_lens.arrow",
        restore_layers="results/analysis/{model}/restore_layers.arrow",
        predictor="results/analysis/{model}/predictor.arrow",
    log:
        "logs/analyze_residuals/{model}.log",
    benchmark:
        "benchmarks/analyze_residuals/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        methods=QUANTIZED,
        settings={**config["analysis"], **config["residuals"]},
        code=CODE["residual_analysis"],
    script:
        "../workflow_scripts/analyze_residuals.py"


rule plot_residuals:
    input:
        errors="results/errors/{model}.arrow",
        selection="results/analysis/{model}/selection.arrow",
        residuals="results/residuals/{model}/fp.arrow",
        norm_error_corr="results/analysis/{model}/norm_error_corr.arrow",
        amplification="results/analysis/{model}/amplification.arrow",
        logit_lens="results/analysis/{model}/logit_lens.arrow",
        restore_layers="results/analysis/{model}/restore_layers.arrow",
    output:
        figure_outputs(RESIDUAL_FIGURES, "3. Residual stream"),
    log:
        "logs/plot_residuals/{model}.log",
    benchmark:
        "benchmarks/plot_residuals/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        names=RESIDUAL_FIGURES,
        code=CODE["residual_plots"],
    script:
        "../workflow_scripts/plot_residuals.py"
