# qbreak: which inputs does low-bit weight-only quantization break, and why?
# Thin entry point: config, validation and helpers in rules/common.smk, one file per stage.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/corpus.smk"
include: "rules/quantize.smk"
include: "rules/nll.smk"
include: "rules/errors.smk"
include: "rules/analysis.smk"
include: "rules/residuals.smk"
include: "rules/patching.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
