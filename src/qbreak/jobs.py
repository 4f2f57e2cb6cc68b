"""Job entry points called by the workflow scripts: file I/O at the edges, one call per rule.

Each function takes plain values (paths, config mappings), so it runs the same from Snakemake,
from a test or from a notebook. `run_job` turns a QbreakError into one line on stderr and exit 1.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qbreak.errors import QbreakError
from qbreak.io import (
    AMPLIFICATION_SCHEMA,
    DIMS_SCHEMA,
    ERRORS_SCHEMA,
    EXAMPLES_SCHEMA,
    KL_SCHEMA,
    NLL_SCHEMA,
    RESIDUALS_SCHEMA,
    TOPK_SCHEMA,
    read_table,
    write_table,
)
from qbreak.runtime import configure

log = logging.getLogger(__name__)


def run_job(job: Callable[..., None], threads: int, **kwargs: Any) -> None:
    """Configure threads, run `job(**kwargs)`; a QbreakError becomes one line and exit status 1."""
    configure(threads)
    start = time.perf_counter()
    try:
        job(**kwargs)
    except QbreakError as exc:
        message = f"qbreak error: {exc}"
        print(message, file=sys.stderr)
        if sys.stderr is not sys.__stderr__:
            print(message, file=sys.__stderr__)
        raise SystemExit(1) from None
    log.info("%s finished in %.1f s", job.__name__, time.perf_counter() - start)


def fetch_model_job(name: str, spec: Mapping[str, Any], output: str) -> None:
    """Materialize config entry models.<name> at `output` (a Hugging Face folder)."""
    from qbreak.models import fetch_model

    fetch_model(name, spec, output)


def _tokenize_corpus(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str
) -> tuple[pa.Table, pa.Table, dict[str, str]]:
    """(evaluation, calibration, metadata) of a corpus entry, tokenized with the model's tokenizer."""
    from qbreak.corpus import build_examples, iter_documents, resolve_start_token
    from qbreak.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir, bool(model_spec.get("trust_remote_code", False)))
    start_id = resolve_start_token(tokenizer, model_spec.get("start_token", "bos"), f"{model_key}.start_token")
    # a method's own calibration corpus carries the config keys its errors should name (rules/common.smk)
    source_key = str(corpus.get("config_key", "corpus"))
    evaluation, calibration = build_examples(
        iter_documents(corpus, source_key),
        tokenizer,
        seq_len=int(corpus["seq_len"]),
        n_examples=int(corpus["n_examples"]),
        n_calibration=int(corpus["n_calibration"]),
        seed=int(corpus["seed"]),
        start_token_id=start_id,
        corpus_name=str(corpus["name"]),
        size_key=str(corpus.get("size_key", "corpus.n_examples")),
        source_key=source_key,
    )
    meta = {
        "corpus": str(corpus["name"]),
        "seq_len": str(corpus["seq_len"]),
        "seed": str(corpus["seed"]),
        "start_token_id": str(start_id),
    }
    return evaluation, calibration, meta


def make_examples_job(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str,
    examples: str, calibration: str,
) -> None:
    """Tokenize the corpus with the model's tokenizer and write the evaluation and calibration splits."""
    evaluation, calib, meta = _tokenize_corpus(corpus, model_spec, model_key, model_dir)
    write_table(evaluation, examples, EXAMPLES_SCHEMA, {**meta, "split": "evaluation"})
    write_table(calib, calibration, EXAMPLES_SCHEMA, {**meta, "split": "calibration"})


def make_calibration_job(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str, calibration: str
) -> None:
    """Tokenize a method's own calibration corpus (n_examples = 0) and write its calibration split."""
    _, calib, meta = _tokenize_corpus(corpus, model_spec, model_key, model_dir)
    write_table(calib, calibration, EXAMPLES_SCHEMA, {**meta, "split": "calibration"})


def _runtime(runtime: Mapping[str, Any]) -> tuple[str, Any, int]:
    from qbreak.runtime import check_device, cpu_has_amx_bf16, torch_dtype

    device, name = str(runtime.get("device", "cpu")), str(runtime.get("dtype", "float32"))
    check_device(device)
    if device == "cpu" and name == "float32" and cpu_has_amx_bf16():
        log.info("this CPU has AMX bfloat16 units: runtime.dtype: bfloat16 runs the model passes about 3x faster "
                 "(NLLs about 0.01 nats from float32's; README, Configuration)")
    return device, torch_dtype(name, device), int(runtime.get("batch_size", 8))


def _log_speed(model_name: str, method: str, nll: pa.Table, seconds: float, what: str = "") -> None:
    n_tokens = int(sum(nll.column("n_tokens").to_pylist()))
    log.info("%s/%s: %d examples, %.0f tokens/s%s", model_name, method, nll.num_rows, n_tokens / seconds, what)


def fp_pass_job(
    model_name: str, model_dir: str, examples: str, nll_output: str, residuals_output: str, dims_output: str,
    runtime: Mapping[str, Any], trust_remote_code: bool = False,
) -> None:
    """One pass of the FP model: per-example NLL, residual norms and kurtosis, per-dimension |r| and γ."""
    score_model_job(
        model_name, model_dir, examples, runtime, fp_outputs={"nll": nll_output, "residuals": residuals_output,
        "dims": dims_output}, trust_remote_code=trust_remote_code,
    )


def compare_job(
    model_name: str, method: str, fp_dir: str, q_dir: str, examples: str, nll_output: str, kl_output: str,
    residuals_output: str, amplification_output: str, runtime: Mapping[str, Any], topk: int,
    trust_remote_code: bool = False,
) -> None:
    """One side-by-side pass of FP and a quantized model: its NLL, KL to FP, residual statistics and
    the amplification of weight error in each MLP (the quantized norm and MLP on the FP residual)."""
    outputs = {"nll": nll_output, "kl": kl_output, "residuals": residuals_output, "amplification": amplification_output}
    score_model_job(
        model_name, fp_dir, examples, runtime, topk=topk, quantized={method: q_dir}, outputs={method: outputs},
        trust_remote_code=trust_remote_code,
    )


FP_OUTPUTS = ("nll", "residuals", "dims")
METHOD_OUTPUTS = ("nll", "kl", "residuals", "amplification")


def score_model_job(
    model_name: str, fp_dir: str, examples: str, runtime: Mapping[str, Any], topk: int | None = None,
    fp_outputs: Mapping[str, str] | None = None, quantized: Mapping[str, str] | None = None,
    outputs: Mapping[str, Mapping[str, str]] | None = None, trust_remote_code: bool = False,
) -> None:
    """One pass over the examples: the FP model once per batch, every quantized model beside it.

    fp_outputs (keys `FP_OUTPUTS`): the FP model's per-example NLL, residual norms and kurtosis, and
    per-dimension |r| and γ; None skips them. quantized: method → model folder; outputs[method]
    (keys `METHOD_OUTPUTS`): the method's NLL, KL to FP (top-k KL with `topk`, default
    kl.DEFAULT_TOPK), residual statistics and the amplification of weight error in each MLP (the
    quantized norm and MLP on the FP residual). The FP model's forward and its head's vocabulary blocks
    run once per batch for all the methods (`passes.run_group_pass`, `kl.GroupCompareStatistic`).
    """
    from qbreak.kl import DEFAULT_TOPK, GroupCompareStatistic
    from qbreak.models import load_model
    from qbreak.nll import NLLStatistic
    from qbreak.passes import iter_batches, run_group_pass
    from qbreak.residuals import AmplificationStatistic, ResidualStatistic, dims_table, norm_weights

    quantized, outputs = dict(quantized or {}), dict(outputs or {})
    if set(outputs) != set(quantized):
        raise ValueError(f"outputs {sorted(outputs)} do not match the quantized models {sorted(quantized)}")
    for keys, names in [(fp_outputs, FP_OUTPUTS), *((outputs[m], METHOD_OUTPUTS) for m in quantized)]:
        if keys is not None and set(keys) != set(names):
            raise ValueError(f"output keys {sorted(keys)}, expected {sorted(names)}")
    if fp_outputs is None and not quantized:
        raise ValueError("score_model_job: nothing to compute (no FP outputs, no quantized models)")

    device, dtype, batch_size = _runtime(runtime)
    table = read_table(examples, EXAMPLES_SCHEMA)

    def load(folder: str) -> Any:
        return load_model(Path(folder), dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    fp = load(fp_dir)
    q_models = {method: load(folder) for method, folder in quantized.items()}
    fp_nll, fp_residuals = NLLStatistic(model_name, "fp"), ResidualStatistic(model_name, "fp")
    fp_statistics: list[Any] = [fp_nll, fp_residuals] if fp_outputs is not None else []
    compare = GroupCompareStatistic(model_name, list(quantized), DEFAULT_TOPK if topk is None else topk)
    residuals = {m: ResidualStatistic(model_name, m) for m in quantized}
    amplification = {m: AmplificationStatistic(model_name, m, q) for m, q in q_models.items()}
    start = time.perf_counter()
    run_group_pass(
        fp, list(q_models.values()), iter_batches(table, batch_size, device), [[] for _ in quantized],
        fp_statistics=[*fp_statistics, *amplification.values()], q_statistics=[[residuals[m]] for m in quantized],
        group_statistics=[compare] if quantized else [],
    )
    seconds = time.perf_counter() - start
    nll = {"fp": fp_nll.result()} if fp_outputs is not None else {}
    nll |= {m: compare.methods[m].nll_table() for m in quantized}
    what = f" (FP and {len(quantized)} quantized side by side)" if quantized else " (NLL and residuals)"
    _log_speed(model_name, ",".join(nll), next(iter(nll.values())), seconds, what)

    def meta(method: str) -> dict[str, str]:
        return {"model": model_name, "method": method, "dtype": str(dtype)}

    if fp_outputs is not None:
        write_table(nll["fp"], fp_outputs["nll"], NLL_SCHEMA, meta("fp"))
        write_table(fp_residuals.result(), fp_outputs["residuals"], RESIDUALS_SCHEMA, meta("fp"))
        dims = dims_table(model_name, fp_residuals.mean_abs_per_dim(), norm_weights(fp))
        write_table(dims, fp_outputs["dims"], DIMS_SCHEMA, meta("fp"))
    for method, files in outputs.items():
        write_table(nll[method], files["nll"], NLL_SCHEMA, meta(method))
        write_table(compare.methods[method].kl_table(), files["kl"], KL_SCHEMA, meta(method))
        write_table(residuals[method].result(), files["residuals"], RESIDUALS_SCHEMA, meta(method))
        write_table(amplification[method].result(), files["amplification"], AMPLIFICATION_SCHEMA, meta(method))


def fp_topk_job(
    model_name: str, model_dir: str, examples: str, output: str, runtime: Mapping[str, Any], topk: int,
    trust_remote_code: bool = False,
) -> None:
    """Store the FP model's top-k log-probs per scored token (a reference for KL without FP)."""
    from qbreak.kl import fp_topk_reference
    from qbreak.models import load_model

    device, dtype, batch_size = _runtime(runtime)
    table = read_table(examples, EXAMPLES_SCHEMA)
    fp = load_model(Path(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    reference = fp_topk_reference(fp, table, model_name, batch_size, device, topk)
    write_table(reference, output, TOPK_SCHEMA, {"model": model_name, "dtype": str(dtype)})


def quantize_job(
    method: str, entry: Mapping[str, Any], model_dir: str, calibration: str | None, output: str, device: str = "cpu"
) -> None:
    """Quantize the FP model with config entry methods.<method> into `output` (calibration: None for
    data-free methods)."""
    from qbreak.quantize.run import quantize_model
    from qbreak.runtime import check_device

    check_device(device)
    quantize_model(method, entry, model_dir, calibration, output, device=device)


def errors_job(fp: str, nll: Mapping[str, str], methods: Mapping[str, Mapping[str, Any]], output: str) -> None:
    """Join the FP NLL with every method's NLL into results/errors/{model}.arrow."""
    from qbreak.errors_table import error_table
    from qbreak.quantize import METHODS

    described = {
        name: {**entry, "family": METHODS[entry["kind"]].family} for name, entry in methods.items() if name in nll
    }
    quantized = {name: read_table(path, NLL_SCHEMA) for name, path in nll.items()}
    table = error_table(read_table(fp, NLL_SCHEMA), quantized, described)
    write_table(table, output, ERRORS_SCHEMA)
    for name in quantized:
        errors = table.filter(pc.equal(table["method"], name))
        log.info("%s: mean error %.4f nats", name, pc.mean(errors["error"]).as_py())


def analyze_errors_job(
    model_name: str, errors: str, kl: Mapping[str, str], examples: str, analysis: Mapping[str, Any],
    correlations: str, summary: str, overlap: str, selection: str, breaking: str, breaking_html: str,
    note: str | None = None,
) -> None:
    """Correlations, top-set overlap, D_large/D_ctrl and breaking_examples.md of one model."""
    from qbreak.breaking import breaking_examples_markdown
    from qbreak.correlate import correlation_table, overlap_table, summary_table
    from qbreak.io import (
        CORRELATION_SUMMARY_SCHEMA,
        CORRELATIONS_SCHEMA,
        OVERLAP_SCHEMA,
        SELECTION_SCHEMA,
        atomic_path,
    )
    from qbreak.selection import SelectionConfig, select_examples

    error_table = read_table(errors, ERRORS_SCHEMA)
    kl_tables = {method: read_table(path, KL_SCHEMA) for method, path in kl.items()}
    example_table = read_table(examples, EXAMPLES_SCHEMA)
    seed = int(analysis.get("seed", 0))
    corr = correlation_table(error_table, kl_tables, model_name, int(analysis.get("bootstrap", 1000)), seed)
    top = overlap_table(error_table, model_name, float(analysis.get("top_fraction", 0.1)))
    config = SelectionConfig(
        methods=analysis.get("methods"),
        top_fraction=float(analysis.get("top_fraction", 0.1)),
        n_large=analysis.get("n_large"),
        ctrl_pool_fraction=float(analysis.get("ctrl_pool_fraction", 0.5)),
        dedup_ngram=int(analysis.get("dedup_ngram", 5)),
        dedup_threshold=float(analysis.get("dedup_threshold", 0.1)),
        seed=seed,
    )
    chosen = select_examples(error_table, example_table, model_name, config)
    meta = {"model": model_name, "seed": str(seed)}
    write_table(corr, correlations, CORRELATIONS_SCHEMA, meta)
    write_table(summary_table(corr, top, model_name), summary, CORRELATION_SUMMARY_SCHEMA, meta)
    write_table(top, overlap, OVERLAP_SCHEMA, meta)
    write_table(chosen, selection, SELECTION_SCHEMA, meta)
    markdown = breaking_examples_markdown(
        chosen, error_table, example_table, model_name,
        int(analysis.get("n_show", 10)), int(analysis.get("show_chars", 600)), note,
    )
    with atomic_path(breaking) as tmp:
        tmp.write_text(markdown)
    markdown_page(breaking, breaking_html, f"Inputs that quantization breaks: {model_name}")
    cross = [r for r in summary_table(corr, top, model_name).to_pylist() if r["group"] == "cross_family"]
    if cross and cross[0]["mean_pearson"] is not None:
        log.info("cross-family mean Pearson r %.3f over %d pairs", cross[0]["mean_pearson"], cross[0]["n_pairs"])


def plot_errors_job(
    model_name: str, errors: str, correlations: str, heatmap: Mapping[str, str], scatter: Mapping[str, str],
    distributions: Mapping[str, str],
) -> None:
    """The error-analysis figures (PNG and SVG) of one model."""
    from qbreak.io import CORRELATIONS_SCHEMA
    from qbreak.plots import correlation_heatmap, error_distributions, error_scatter, save_figure

    error_table = read_table(errors, ERRORS_SCHEMA)
    corr = read_table(correlations, CORRELATIONS_SCHEMA)
    save_figure(correlation_heatmap(corr, error_table, model_name), heatmap["png"], heatmap["svg"])
    save_figure(error_scatter(corr, error_table, model_name), scatter["png"], scatter["svg"])
    save_figure(error_distributions(error_table, model_name), distributions["png"], distributions["svg"])


def _selected_examples(examples: str, selection: str) -> pa.Table:
    """The evaluation examples in D_large or D_ctrl, with their set in column 'set'."""
    from qbreak.io import SELECTION_SCHEMA

    table = read_table(examples, EXAMPLES_SCHEMA)
    chosen = read_table(selection, SELECTION_SCHEMA)
    sets = {
        i: s for i, s in zip(chosen.column("example_id").to_pylist(), chosen.column("set").to_pylist(), strict=True)
        if s in ("large", "ctrl")
    }
    keep = [i in sets for i in table.column("example_id").to_pylist()]
    return table.filter(pa.array(keep))


def lens_job(
    model_name: str, method: str, model_dir: str, examples: str, selection: str, output: str,
    runtime: Mapping[str, Any], layers: list[int] | None = None, trust_remote_code: bool = False,
) -> None:
    """Logit lens of one model (FP or quantized) on D_large and D_ctrl."""
    from qbreak.io import LENS_SCHEMA
    from qbreak.lens import logit_lens
    from qbreak.models import load_model

    device, dtype, batch_size = _runtime(runtime)
    subset = _selected_examples(examples, selection)
    model = load_model(Path(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    table = logit_lens(model, subset, model_name, method, layers, batch_size, device)
    write_table(table, output, LENS_SCHEMA, {"model": model_name, "method": method})


def restore_job(
    model_name: str, method: str, fp_dir: str, q_dir: str, examples: str, selection: str, output: str,
    runtime: Mapping[str, Any], ranges: list[list[int]] | None = None, trust_remote_code: bool = False,
) -> None:
    """NLL on D_large and D_ctrl of the quantized model with late layers restored to FP."""
    from qbreak.hooks import decoder_layers
    from qbreak.io import RESTORE_SCHEMA
    from qbreak.lens import parse_layer_ranges, restore_table
    from qbreak.models import load_model

    device, dtype, batch_size = _runtime(runtime)
    subset = _selected_examples(examples, selection)
    fp = load_model(Path(fp_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    quantized = load_model(Path(q_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    labelled = parse_layer_ranges(ranges, len(decoder_layers(fp)), "residuals.restore_ranges")
    table = restore_table(quantized, fp, subset, model_name, method, labelled, batch_size, device)
    write_table(table, output, RESTORE_SCHEMA, {"model": model_name, "method": method})


def analyze_residuals_job(
    model_name: str, errors: str, selection: str, residuals_fp: str, dims: str,
    amplification: Mapping[str, str], lens: Mapping[str, str], restore: Mapping[str, str],
    nll: Mapping[str, str], settings: Mapping[str, Any], outputs: Mapping[str, str],
) -> None:
    """Norm–error correlations, amplification, γ of outlier dims, logit lens, restoring, predictor."""
    from qbreak.io import (
        AMPLIFICATION_SCHEMA,
        AMPLIFICATION_SUMMARY_SCHEMA,
        GAMMA_OUTLIERS_SCHEMA,
        LENS_SCHEMA,
        LENS_SUMMARY_SCHEMA,
        NORM_CORR_SCHEMA,
        PREDICTOR_SCHEMA,
        RESTORE_SCHEMA,
        RESTORE_SUMMARY_SCHEMA,
        SELECTION_SCHEMA,
    )
    from qbreak.residual_analysis import (
        amplification_summary,
        gamma_outliers,
        lens_summary,
        norm_error_correlations,
        predictor_table,
        restore_summary,
    )

    error_table = read_table(errors, ERRORS_SCHEMA)
    chosen = read_table(selection, SELECTION_SCHEMA)
    fp_residuals = read_table(residuals_fp, RESIDUALS_SCHEMA)
    n_boot, seed = int(settings.get("bootstrap", 1000)), int(settings.get("seed", 0))
    meta = {"model": model_name, "seed": str(seed)}
    write_table(
        norm_error_correlations(fp_residuals, error_table, model_name, n_boot, seed),
        outputs["norm_error_corr"], NORM_CORR_SCHEMA, meta,
    )
    amp = {method: read_table(path, AMPLIFICATION_SCHEMA) for method, path in amplification.items()}
    write_table(
        amplification_summary(amp, fp_residuals, error_table, model_name, n_boot, seed),
        outputs["amplification"], AMPLIFICATION_SUMMARY_SCHEMA, meta,
    )
    write_table(
        gamma_outliers(read_table(dims, DIMS_SCHEMA), model_name, int(settings.get("n_outliers", 5))),
        outputs["gamma_outliers"], GAMMA_OUTLIERS_SCHEMA, meta,
    )
    lens_tables = {method: read_table(path, LENS_SCHEMA) for method, path in lens.items()}
    write_table(lens_summary(lens_tables, chosen, model_name), outputs["logit_lens"], LENS_SUMMARY_SCHEMA, meta)
    restore_tables = {method: read_table(path, RESTORE_SCHEMA) for method, path in restore.items()}
    nll_tables = {method: read_table(path, NLL_SCHEMA) for method, path in nll.items()}
    write_table(
        restore_summary(restore_tables, nll_tables, chosen, model_name),
        outputs["restore_layers"], RESTORE_SUMMARY_SCHEMA, meta,
    )
    write_table(
        predictor_table(
            fp_residuals, error_table, chosen, model_name, float(settings.get("top_fraction", 0.1)),
            int(settings.get("folds", 5)), seed,
        ),
        outputs["predictor"], PREDICTOR_SCHEMA, meta,
    )


def plot_residuals_job(model_name: str, inputs: Mapping[str, str], figures: Mapping[str, Mapping[str, str]]) -> None:
    """The residual-stream figures (PNG and SVG) of one model."""
    from qbreak.io import (
        AMPLIFICATION_SUMMARY_SCHEMA,
        LENS_SUMMARY_SCHEMA,
        NORM_CORR_SCHEMA,
        RESTORE_SUMMARY_SCHEMA,
        SELECTION_SCHEMA,
    )
    from qbreak.plots import save_figure
    from qbreak.residual_plots import (
        amplification_curves,
        logit_lens_curves,
        norm_error_correlation,
        residual_norms,
        restore_bars,
    )

    drawn = {
        "residual_norms": lambda: residual_norms(
            read_table(inputs["residuals"], RESIDUALS_SCHEMA), read_table(inputs["selection"], SELECTION_SCHEMA),
            model_name,
        ),
        "norm_error_correlation": lambda: norm_error_correlation(
            read_table(inputs["norm_error_corr"], NORM_CORR_SCHEMA), model_name
        ),
        "logit_lens": lambda: logit_lens_curves(read_table(inputs["logit_lens"], LENS_SUMMARY_SCHEMA), model_name),
        "amplification": lambda: amplification_curves(
            read_table(inputs["amplification"], AMPLIFICATION_SUMMARY_SCHEMA), model_name
        ),
        "restore_layers": lambda: restore_bars(read_table(inputs["restore_layers"], RESTORE_SUMMARY_SCHEMA), model_name),
    }
    for name, paths in figures.items():
        save_figure(drawn[name](), paths["png"], paths["svg"])


def patch_job(
    model_name: str, method: str, kind: str, fp_dir: str, q_dir: str, examples: str, selection: str, output: str,
    runtime: Mapping[str, Any], settings: Mapping[str, Any], trust_remote_code: bool = False,
) -> None:
    """FP → quantized activation patching of one method on D_large and D_ctrl."""
    from qbreak.hooks import decoder_layers
    from qbreak.io import PATCHING_SCHEMA
    from qbreak.models import load_model
    from qbreak.patching import build_patches, patching_table, valid_sites

    device, dtype, batch_size = _runtime(runtime)
    subset = _selected_examples(examples, selection)
    fp = load_model(Path(fp_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    quantized = load_model(Path(q_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    n_layers = len(decoder_layers(fp))
    sweep = settings.get("sweep_layers")
    sites, weight_sites = (valid_sites(list(settings.get(key, [])), kind) for key in ("sites", "weight_sites"))
    asked = set(settings.get("sites", [])) | set(settings.get("weight_sites", []))
    skipped = sorted(asked - set(sites) - set(weight_sites))
    if skipped:
        log.warning("%s is %s, whose folded scales change the basis of %s: not patched", method, kind, skipped)
    patches = build_patches(
        n_layers, sites, list(range(n_layers)) if sweep is None else list(sweep), settings.get("ranges"), weight_sites
    )
    start = time.perf_counter()
    table = patching_table(fp, quantized, subset, model_name, method, patches, batch_size, device)
    log.info("%s/%s: %d patches on %d examples in %.0f s", model_name, method, len(patches), subset.num_rows,
             time.perf_counter() - start)
    write_table(table, output, PATCHING_SCHEMA, {"model": model_name, "method": method})


def summarize_patching_job(
    model_name: str, patching: Mapping[str, str], nll_fp: str, selection: str, table: str, markdown: str,
    html: str, figures: Mapping[str, Mapping[str, str]], note: str | None = None,
) -> None:
    """The Table-4 layout (Arrow and markdown) and the patching figures of one model."""
    from qbreak.io import PATCH_SUMMARY_SCHEMA, PATCHING_SCHEMA, SELECTION_SCHEMA, atomic_path
    from qbreak.patching_summary import patching_markdown, patching_summary
    from qbreak.plots import save_figure
    from qbreak.residual_plots import patching_bars, patching_sweep

    tables = {method: read_table(path, PATCHING_SCHEMA) for method, path in patching.items()}
    summary = patching_summary(tables, read_table(nll_fp, NLL_SCHEMA), read_table(selection, SELECTION_SCHEMA), model_name)
    write_table(summary, table, PATCH_SUMMARY_SCHEMA, {"model": model_name})
    with atomic_path(markdown) as tmp:
        tmp.write_text(patching_markdown(summary, model_name, note))
    markdown_page(markdown, html, f"FP → quantized activation patching: {model_name}")
    save_figure(patching_bars(summary, model_name), figures["patching_sites"]["png"], figures["patching_sites"]["svg"])
    save_figure(patching_sweep(summary, model_name), figures["patching_sweep"]["png"], figures["patching_sweep"]["svg"])


def markdown_page(source: str, output: str, title: str) -> None:
    """Render the markdown file `source` as a standalone HTML page at `output` (for the report)."""
    from qbreak.io import atomic_path
    from qbreak.report import html_page

    with atomic_path(output) as tmp:
        tmp.write_text(html_page(title, Path(source).read_text()))


def report_overview_job(
    model_name: str, quantized: Mapping[str, str], tables: Mapping[str, str], config_text: str, overview: str,
    note: str | None = None,
) -> None:
    """results/report/{model}/overview.html: caveat, quantization metadata, summary tables, config used."""
    import json

    from qbreak.io import CORRELATION_SUMMARY_SCHEMA, PREDICTOR_SCHEMA, RESTORE_SUMMARY_SCHEMA, atomic_path
    from qbreak.report import html_page, overview_markdown

    schemas = {
        "correlation_summary": CORRELATION_SUMMARY_SCHEMA,
        "predictor": PREDICTOR_SCHEMA,
        "restore_layers": RESTORE_SUMMARY_SCHEMA,
    }
    quant = {}
    for name, folder in quantized.items():
        path = Path(folder) / "quant.json"
        try:
            quant[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QbreakError(f"{path}: not readable quantization metadata ({exc})") from None
    read = {name: read_table(path, schemas[name]) for name, path in tables.items()}
    page = html_page(f"qbreak: {model_name}", overview_markdown(model_name, note, quant, read, config_text))
    with atomic_path(overview) as tmp:
        tmp.write_text(page)
