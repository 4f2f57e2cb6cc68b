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
    log:
        "logs/analyze_errors/{model}.log",
    benchmark:
        "benchmarks/analyze_errors/{model}.tsv"
    conda:
        "../envs/qbreak.yaml"
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
        heatmap_png="results/figures/{model}/error_correlations.png",
        heatmap_svg="results/figures/{model}/error_correlations.svg",
        scatter_png="results/figures/{model}/error_scatter.png",
        scatter_svg="results/figures/{model}/error_scatter.svg",
        distributions_png="results/figures/{model}/error_distributions.png",
        distributions_svg="results/figures/{model}/error_distributions.svg",
    log:
        "logs/plot_errors/{model}.log",
    benchmark:
        "benchmarks/plot_errors/{model}.tsv"
    conda:
        "../envs/qbreak.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        code=CODE["plots"],
    script:
        "../workflow_scripts/plot_errors.py"
