# FP → quantized activation patching on D_large and D_ctrl, for the methods in patching.methods.


rule patch_activations:
    input:
        fp="results/models/{model}/fp",
        model=model_dir,
        examples=examples_file,
        selection="results/analysis/{model}/selection.arrow",
    output:
        "results/patching/{model}/{method}.arrow",
    log:
        "logs/patch_activations/{model}/{method}.log",
    benchmark:
        "benchmarks/patch_activations/{model}/{method}.tsv"
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
        settings=config["patching"],
        kind=method_kind,
        trust_remote_code=trust_remote_code,
        code=CODE["patching"],
    script:
        "../workflow_scripts/patch_activations.py"


rule summarize_patching:
    input:
        patching=patching_files,
        nll_fp="results/nll/{model}/fp.arrow",
        selection="results/analysis/{model}/selection.arrow",
    output:
        table="results/analysis/{model}/patching_table.arrow",
        markdown="results/analysis/{model}/patching_table.md",
        html=report(
            "results/analysis/{model}/patching_table.html",
            caption="../report/patching_table.rst",
            category="4. Activation patching",
            subcategory="{model}",
        ),
        sites_png=report(
            "results/figures/{model}/patching_sites.png",
            caption="../report/patching_sites.rst",
            category="4. Activation patching",
            subcategory="{model}",
        ),
        sites_svg="results/figures/{model}/patching_sites.svg",
        sweep_png=report(
            "results/figures/{model}/patching_sweep.png",
            caption="../report/patching_sweep.rst",
            category="4. Activation patching",
            subcategory="{model}",
        ),
        sweep_svg="results/figures/{model}/patching_sweep.svg",
    log:
        "logs/summarize_patching/{model}.log",
    benchmark:
        "benchmarks/summarize_patching/{model}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        methods=PATCHED,
        note=model_note,
        code=CODE["patching_summary"],
    script:
        "../workflow_scripts/summarize_patching.py"
