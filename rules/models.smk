rule fetch_model:
    output:
        directory("results/models/{model}/fp"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/fetch_model/{model}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(2, 3000),
    params:
        spec=model_spec,
        code=CODE["models"],
    script:
        "../workflow_scripts/fetch_model.py"
