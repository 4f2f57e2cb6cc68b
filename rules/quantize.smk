rule quantize_model:
    input:
        model="results/models/{model}/fp",
        calibration=calibration_file,
    output:
        directory("results/models/{model}/{method}"),
    log:
        "logs/quantize_model/{model}/{method}.log",
    benchmark:
        "benchmarks/quantize_model/{model}/{method}.tsv"
    wildcard_constraints:
        method=_alternatives(QUANTIZED),
    conda:
        "../envs/models.yaml"
    # Scaled down to --cores: a quantization job uses every core, never sharing them.
    threads: 8
    resources:
        mem_mb=mem_mb(3, 4400),
        gpu=GPU,
    params:
        entry=method_entry,
        device=config["runtime"]["device"],
        code=quantize_code,
    script:
        "../workflow_scripts/quantize_model.py"
