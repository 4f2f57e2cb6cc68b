rule collect_errors:
    input:
        fp="results/nll/{model}/fp.arrow",
        nll=quantized_nll_files,
    output:
        "results/errors/{model}.arrow",
    log:
        "logs/collect_errors/{model}.log",
    benchmark:
        "benchmarks/collect_errors/{model}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        methods=config["methods"],
        code=CODE["errors"],
    script:
        "../workflow_scripts/collect_errors.py"
