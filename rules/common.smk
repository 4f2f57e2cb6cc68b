# Config validation, wildcard constraints and input functions. No rules here.
import re

from snakemake.utils import validate

from qbreak.config import check_config, load_schema
from qbreak.provenance import source_hash

# One clear line naming the bad key first, then Snakemake's validation fills in the defaults.
check_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
validate(config, schema="../schemas/config.schema.yaml")

MODELS = list(config["models"])
CORPUS = config["corpus"]["name"]
QUANTIZED = list(config.get("methods") or {})
METHODS = ["fp", *QUANTIZED]
# Calibration corpora other than the main corpus (methods.<name>.calibration), by name.
CALIBRATION = {
    entry["calibration"]["name"]: entry["calibration"]
    for entry in (config.get("methods") or {}).values()
    if entry.get("calibration")
}
if CORPUS in CALIBRATION:
    raise ValueError(
        f"config key methods.*.calibration.name: '{CORPUS}' is the main corpus's name; choose another"
    )


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=_alternatives(MODELS),
    corpus=re.escape(CORPUS),
    calibration=_alternatives(CALIBRATION) or "(?!)",
    method=_alternatives(METHODS),


# Snakemake cannot see inside the installed qbreak package: a hash of each stage's modules goes
# into that stage's params, so editing a stage's code reruns exactly that stage.
CODE = {
    "models": source_hash("models", "io", "jobs"),
    "corpus": source_hash("corpus", "models", "io", "jobs"),
    "nll": source_hash("nll", "passes", "models", "io", "runtime", "jobs"),
    "quantize": source_hash(
        "quantize.base",
        "quantize.rtn",
        "quantize.nf",
        "quantize.hqq",
        "quantize.gptq",
        "quantize.awq",
        "quantize.oneshot",
        "quantize.run",
        "models",
        "io",
        "jobs",
    ),
    "errors": source_hash("errors_table", "io", "jobs"),
}


def model_spec(wildcards):
    return config["models"][wildcards.model]


def trust_remote_code(wildcards):
    return bool(config["models"][wildcards.model].get("trust_remote_code", False))


def model_dir(wildcards):
    return f"results/models/{wildcards.model}/{wildcards.method}"


def method_entry(wildcards):
    return config["methods"][wildcards.method]


def calibration_file(wildcards):
    source = config["methods"][wildcards.method].get("calibration")
    corpus = source["name"] if source else CORPUS
    return f"results/corpus/{corpus}/{wildcards.model}/calibration.arrow"


def calibration_corpus(wildcards):
    """The calibration corpus entry, with the sizes it needs from the corpus and its methods."""
    samples = [
        int(entry.get("calibration_samples", 64))
        for entry in config["methods"].values()
        if (entry.get("calibration") or {}).get("name") == wildcards.calibration
    ]
    sizes = {k: config["corpus"][k] for k in ("seq_len", "seed")}
    return {
        **CALIBRATION[wildcards.calibration],
        **sizes,
        "n_examples": 0,
        "n_calibration": max(samples),
    }


def quantized_nll_files(wildcards):
    return [f"results/nll/{wildcards.model}/{method}.arrow" for method in QUANTIZED]


def examples_file(wildcards):
    return f"results/corpus/{CORPUS}/{wildcards.model}/examples.arrow"


def get_final_output():
    outputs = expand("results/nll/{model}/fp.arrow", model=MODELS)
    if QUANTIZED:
        outputs += expand("results/errors/{model}.arrow", model=MODELS)
    return outputs
