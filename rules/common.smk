# Config validation, wildcard constraints and input functions. No rules here.
import os
import re

import yaml

from snakemake.utils import validate

from qbreak.config import (
    CALIBRATED_KINDS,
    KIND_MODULES,
    canonical_order,
    check_config,
    check_config_files,
    check_group_sizes,
    check_layer_settings,
    load_schema,
)
from qbreak.errors import QbreakError
from qbreak.models import (
    BUNDLED_MODELS,
    model_layers,
    model_linear_widths,
    model_parameters,
)
from qbreak.provenance import source_hash

# One clear line naming the bad key (or the config file's duplicated key) first, then Snakemake's
# validation fills in the defaults. A config error ends the run as "qbreak error: ..." alone, like
# a job's (SystemExit: Snakemake prints its message without a traceback), exit status 1.
try:
    check_config_files(workflow.configfiles)
    try:
        check_config(
            config, load_schema(workflow.source_path("../schemas/config.schema.yaml"))
        )
    except QbreakError as error:
        # --configfile other.yaml without --replace-workflow-config merges it over config.yaml
        files = sorted({os.path.abspath(f) for f in workflow.configfiles})
        if len(files) > 1 and not workflow.config_settings.replace_workflow_config:
            raise QbreakError(
                f"{error} (the config merges {files}: add --replace-workflow-config to use only the last)"
            ) from None
        raise
    validate(config, schema="../schemas/config.schema.yaml")
    # keys in one order, whatever the file's, so that params compare equal across reorderings
    _canonical = canonical_order(config)
    config.clear()
    config.update(_canonical)
    # Layer settings and group sizes against each model whose config.json is already here (the
    # jobs check again).
    for _name, _spec in config["models"].items():
        if (_layers := model_layers(_spec)) is not None:
            check_layer_settings(config, _name, _layers)
        if (_widths := model_linear_widths(_spec)) is not None:
            check_group_sizes(config, _name, _widths)
except QbreakError as error:
    raise SystemExit(f"qbreak error: {error}") from None

MODELS = list(config["models"])
CORPUS = config["corpus"]["name"]
QUANTIZED = list(config.get("methods") or {})
METHODS = ["fp", *QUANTIZED]
PATCHED = list(config["patching"]["methods"])
# Calibration corpora other than the main corpus (methods.<name>.calibration), by name.
CALIBRATION = {
    entry["calibration"]["name"]: entry["calibration"]
    for entry in (config.get("methods") or {}).values()
    if entry.get("calibration")
}


# Job resources sized from the model: float32 (or runtime.dtype) weights in MB, from config.json
# (an hf model not yet in the cache counts as the bundled 135M one until it is fetched).
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}[config["runtime"]["dtype"]]
MODEL_MB = {
    name: (model_parameters(spec) or 134_515_008) * _DTYPE_BYTES / 2**20
    for name, spec in config["models"].items()
}
# One GPU per model-pass job when the passes run on CUDA (snakemake-executor-plugin-slurm: --gpus).
GPU = 1 if str(config["runtime"]["device"]).startswith("cuda") else 0


def mem_mb(copies, extra):
    """mem_mb of a model job: `copies` of the model's weights plus `extra` MB (activations, logit
    chunks, libraries; measured on the bundled model, peak RSS in benchmarks/)."""
    return lambda wildcards: int(copies * MODEL_MB[wildcards.model] + extra)


RESIDUAL_FIGURES = [
    "residual_norms",
    "norm_error_correlation",
    "logit_lens",
    "amplification",
    "restore_layers",
]


def figure_outputs(names, category):
    """PNG (shown in the report, caption report/<name>.rst) and SVG of each figure, in that order."""
    files = []
    for name in names:
        png = f"results/figures/{{model}}/{name}.png"
        caption = f"../report/{name}.rst"
        files += [flag_for_report(png, caption, category), png[:-3] + "svg"]
    return files


def flag_for_report(path, caption, category):
    # Snakemake's report() flag; called through this helper because a line that starts with
    # `report(` inside a function is parsed as the workflow's `report:` directive.
    return globals()["report"](
        path, caption=caption, category=category, subcategory="{model}"
    )


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=_alternatives(MODELS),
    corpus=re.escape(CORPUS),
    calibration=_alternatives(CALIBRATION) or "(?!)",
    method=_alternatives(METHODS),


# Snakemake cannot see inside the installed qbreak package: a hash of each stage's modules goes
# into that stage's params, so editing a stage's code reruns exactly that stage. source_hash also
# hashes every qbreak module the named ones (or functions) import, so a list cannot miss one.
JOBS = ("jobs:run_job", "jobs:_runtime")
MODEL_PASS = (
    "passes",
    "nll",
    "hooks",
    "models",
    "io",
    "runtime",
    *JOBS,
    "jobs:_log_speed",
)
# score_fp, compare_to_fp and score_model all run jobs.score_model_job
SCORE_MODEL = (*MODEL_PASS, "kl", "residuals", "jobs:score_model_job")


# Each method kind's quantize jobs hash their own quantizer (and what it imports), the shared
# quantize code and the registry's own source, not the other kinds' quantizers.
def _quantize_hash(quantizer):
    return source_hash(
        quantizer,
        "quantize.run",
        "models",
        "io",
        *JOBS,
        "jobs:quantize_job",
        leaves=frozenset({"quantize"}),
    )


QUANTIZE_CODE = {kind: _quantize_hash(path) for kind, path in KIND_MODULES.items()}
CODE = {
    "models": source_hash("models", "io", *JOBS, "jobs:fetch_model_job"),
    "corpus": source_hash(
        "corpus",
        "models",
        "io",
        *JOBS,
        "jobs:_tokenize_corpus",
        "jobs:make_examples_job",
        "jobs:make_calibration_job",
    ),
    "fp_pass": source_hash(*SCORE_MODEL, "jobs:fp_pass_job"),
    "compare": source_hash(*SCORE_MODEL, "jobs:compare_job"),
    "model_pass": source_hash(*SCORE_MODEL),
    "topk": source_hash(*MODEL_PASS, "kl", "jobs:fp_topk_job"),
    "errors": source_hash("errors_table", "io", *JOBS, "jobs:errors_job"),
    "analysis": source_hash(
        "correlate",
        "selection",
        "breaking",
        "report",
        "io",
        *JOBS,
        "jobs:analyze_errors_job",
        "jobs:markdown_page",
    ),
    "plots": source_hash("plots", "correlate", "io", *JOBS, "jobs:plot_errors_job"),
    "lens": source_hash(
        *MODEL_PASS, "lens", "jobs:lens_job", "jobs:_selected_examples"
    ),
    "restore": source_hash(
        *MODEL_PASS, "lens", "jobs:restore_job", "jobs:_selected_examples"
    ),
    "residual_analysis": source_hash(
        "residual_analysis", "correlate", "io", *JOBS, "jobs:analyze_residuals_job"
    ),
    "patching": source_hash(
        *MODEL_PASS, "patching", "jobs:patch_job", "jobs:_selected_examples"
    ),
    "patching_summary": source_hash(
        "patching_summary",
        "residual_plots",
        "plots",
        "report",
        "io",
        *JOBS,
        "jobs:summarize_patching_job",
        "jobs:markdown_page",
    ),
    "report": source_hash("report", "io", *JOBS, "jobs:report_overview_job"),
    "residual_plots": source_hash(
        "residual_plots",
        "residual_analysis",
        "correlate",
        "io",
        *JOBS,
        "jobs:plot_residuals_job",
    ),
}


def config_text(wildcards):
    """The configuration this run used, as YAML (shown on the report's overview page)."""
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def model_spec(wildcards):
    return config["models"][wildcards.model]


def trust_remote_code(wildcards):
    return bool(config["models"][wildcards.model].get("trust_remote_code", False))


def model_dir(wildcards):
    return f"results/models/{wildcards.model}/{wildcards.method}"


def method_entry(wildcards):
    return config["methods"][wildcards.method]


def method_kind(wildcards):
    return config["methods"][wildcards.method]["kind"]


def quantize_code(wildcards):
    return QUANTIZE_CODE[method_kind(wildcards)]


def calibration_file(wildcards):
    """The calibration split a method reads; none for data-free methods (RTN, NF, HQQ), so that new
    examples do not requantize them."""
    if config["methods"][wildcards.method]["kind"] not in CALIBRATED_KINDS:
        return []
    source = config["methods"][wildcards.method].get("calibration")
    corpus = source["name"] if source else CORPUS
    return f"results/corpus/{corpus}/{wildcards.model}/calibration.arrow"


def calibration_corpus(wildcards):
    """The calibration corpus entry, with the sizes it needs from the corpus and its methods."""
    samples = {
        name: int(entry.get("calibration_samples", 64))
        for name, entry in config["methods"].items()
        if (entry.get("calibration") or {}).get("name") == wildcards.calibration
    }
    largest = max(samples, key=samples.get)
    sizes = {k: config["corpus"][k] for k in ("seq_len", "seed")}
    return {
        **CALIBRATION[wildcards.calibration],
        **sizes,
        "n_examples": 0,
        "n_calibration": samples[largest],
        # the config keys the job's errors name
        "config_key": f"methods.{largest}.calibration",
        "size_key": f"methods.{largest}.calibration_samples",
    }


def quantized_nll_files(wildcards):
    return [f"results/nll/{wildcards.model}/{method}.arrow" for method in QUANTIZED]


def quantized_kl_files(wildcards):
    return [f"results/kl/{wildcards.model}/{method}.arrow" for method in QUANTIZED]


def residual_analysis_inputs(wildcards):
    m = wildcards.model
    return {
        "errors": f"results/errors/{m}.arrow",
        "selection": f"results/analysis/{m}/selection.arrow",
        "residuals_fp": f"results/residuals/{m}/fp.arrow",
        "dims": f"results/residuals/{m}/fp_dims.arrow",
        "amplification": [f"results/amplification/{m}/{q}.arrow" for q in QUANTIZED],
        "lens": [f"results/lens/{m}/{method}.arrow" for method in METHODS],
        "restore": [f"results/restore/{m}/{q}.arrow" for q in QUANTIZED],
        "nll": [f"results/nll/{m}/{method}.arrow" for method in METHODS],
    }


def patching_files(wildcards):
    return [f"results/patching/{wildcards.model}/{method}.arrow" for method in PATCHED]


def model_note(wildcards):
    """The caveat a bundled model's numbers carry (None for other models)."""
    bundled = config["models"][wildcards.model].get("bundled")
    return BUNDLED_MODELS[bundled]["caveat"] if bundled else None


def examples_file(wildcards):
    return f"results/corpus/{CORPUS}/{wildcards.model}/examples.arrow"


def get_final_output():
    outputs = expand("results/nll/{model}/fp.arrow", model=MODELS)
    if QUANTIZED:
        outputs += expand(
            [
                "results/errors/{model}.arrow",
                "results/analysis/{model}/breaking_examples.md",
                "results/figures/{model}/error_correlations.png",
                "results/figures/{model}/residual_norms.png",
                "results/report/{model}/overview.html",
            ],
            model=MODELS,
        )
    if PATCHED:
        outputs += expand("results/analysis/{model}/patching_table.md", model=MODELS)
    if config["kl"]["store_fp_topk"]:
        outputs += expand("results/kl/{model}/fp_topk.arrow", model=MODELS)
    return outputs
