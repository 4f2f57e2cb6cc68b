# The overview page of `snakemake --report`: caveat, quantization metadata, summary tables, config.


rule report_overview:
    input:
        quantized=lambda w: expand(
            "results/models/{model}/{method}", model=w.model, method=QUANTIZED
        ),
        correlation_summary="results/analysis/{model}/correlation_summary.arrow",
        predictor="results/analysis/{model}/predictor.arrow",
        restore_layers="results/analysis/{model}/restore_layers.arrow",
    output:
        report(
            "results/report/{model}/overview.html",
            caption="../report/overview.rst",
            category="0. Overview",
            subcategory="{model}",
        ),
    log:
        "logs/report_overview/{model}.log",
    benchmark:
        "benchmarks/report_overview/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        methods=QUANTIZED,
        config_text=config_text,
        note=model_note,
        code=CODE["report"],
    script:
        "../workflow_scripts/report_overview.py"
