rule make_examples:
    input:
        model="results/models/{model}/fp",
    output:
        examples="results/corpus/{corpus}/{model}/examples.arrow",
        calibration="results/corpus/{corpus}/{model}/calibration.arrow",
    log:
        "logs/make_examples/{corpus}/{model}.log",
    benchmark:
        "benchmarks/make_examples/{corpus}/{model}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        corpus=config["corpus"],
        spec=model_spec,
        code=CODE["corpus"],
    script:
        "../workflow_scripts/make_examples.py"


rule make_calibration:
    input:
        model="results/models/{model}/fp",
    output:
        calibration="results/corpus/{calibration}/{model}/calibration.arrow",
    log:
        "logs/make_calibration/{calibration}/{model}.log",
    benchmark:
        "benchmarks/make_calibration/{calibration}/{model}.tsv"
    conda:
        "../envs/models.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        corpus=calibration_corpus,
        spec=model_spec,
        code=CODE["corpus"],
    script:
        "../workflow_scripts/make_calibration.py"
