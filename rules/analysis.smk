rule analyze_errors:
    input:
        errors="results/errors/{model}.arrow",
        kl=quantized_kl_files,
        examples=examples_file,
    output:
        correlations="results/analysis/{model}/correlations.arrow",
        summary="results/analysis/{model}/correlation_summary.arrow",
        overlap="results/analysis/{model}/overlap.arrow",
        selection="results/analysis/{model}/selection.arrow",
        breaking="results/analysis/{model}/breaking_examples.md",
        breaking_html=report(
            "results/analysis/{model}/breaking_examples.html",
            caption="../report/breaking_examples.rst",
            category="1. Inputs that break",
            subcategory="{model}",
        ),
    log:
        "logs/analyze_errors/{model}.log",
    benchmark:
        "benchmarks/analyze_errors/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        analysis=config["analysis"],
        methods=QUANTIZED,
        note=model_note,
        code=CODE["analysis"],
    script:
        "../workflow_scripts/analyze_errors.py"


rule plot_errors:
    input:
        errors="results/errors/{model}.arrow",
        correlations="results/analysis/{model}/correlations.arrow",
    output:
        heatmap_png=report(
            "results/figures/{model}/error_correlations.png",
            caption="../report/error_correlations.rst",
            category="2. Error analysis",
            subcategory="{model}",
        ),
        heatmap_svg="results/figures/{model}/error_correlations.svg",
        scatter_png=report(
            "results/figures/{model}/error_scatter.png",
            caption="../report/error_scatter.rst",
            category="2. Error analysis",
            subcategory="{model}",
        ),
        scatter_svg="results/figures/{model}/error_scatter.svg",
        distributions_png=report(
            "results/figures/{model}/error_distributions.png",
            caption="../report/error_distributions.rst",
            category="2. Error analysis",
            subcategory="{model}",
        ),
        distributions_svg="results/figures/{model}/error_distributions.svg",
    log:
        "logs/plot_errors/{model}.log",
    benchmark:
        "benchmarks/plot_errors/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        code=CODE["plots"],
    script:
        "../workflow_scripts/plot_errors.py"
