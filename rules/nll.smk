rule compute_nll:
    input:
        model=model_dir,
        examples=examples_file,
    output:
        "results/nll/{model}/{method}.arrow",
    log:
        "logs/compute_nll/{model}/{method}.log",
    benchmark:
        "benchmarks/compute_nll/{model}/{method}.tsv"
    conda:
        "../envs/qbreak.yaml"
    # Scaled down to --cores; one model pass at a time uses every core without oversubscribing.
    threads: 8
    resources:
        mem_mb=4000,
    params:
        runtime=config["runtime"],
        trust_remote_code=trust_remote_code,
        code=CODE["nll"],
    script:
        "../workflow_scripts/compute_nll.py"
