"""The real Snakefile end to end on the tiny config, in a temporary folder."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml

from qbreak import __version__
from qbreak.io import (
    CORRELATION_SUMMARY_SCHEMA,
    CORRELATIONS_SCHEMA,
    ERRORS_SCHEMA,
    EXAMPLES_SCHEMA,
    KL_SCHEMA,
    NLL_SCHEMA,
    OVERLAP_SCHEMA,
    SELECTION_SCHEMA,
    RESIDUALS_SCHEMA,
    AMPLIFICATION_SCHEMA,
    NORM_CORR_SCHEMA,
    AMPLIFICATION_SUMMARY_SCHEMA,
    GAMMA_OUTLIERS_SCHEMA,
    LENS_SUMMARY_SCHEMA,
    RESTORE_SUMMARY_SCHEMA,
    PREDICTOR_SCHEMA,
    PATCHING_SCHEMA,
    PATCH_SUMMARY_SCHEMA,
    read_table,
    table_metadata,
)
from qbreak.patching_summary import UP_SITE_NOTE
from tests.conftest import (
    BLOCK_MODEL_LIBRARIES, REPO, RUN_TO_RUN_ATOL, RUN_TO_RUN_RTOL, SNAKEMAKE, float_environment_resets, run_snakemake,
    table_difference, table_mismatch,
)

pytestmark = pytest.mark.slow


def test_examples_table(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())["corpus"]
    folder = tiny_run / "results" / "corpus" / "wikipedia-vital" / "smollm2-135m"
    examples = read_table(folder / "examples.arrow")
    calibration = read_table(folder / "calibration.arrow")
    assert examples.schema.equals(EXAMPLES_SCHEMA, check_metadata=False)
    assert (examples.num_rows, calibration.num_rows) == (config["n_examples"], config["n_calibration"])
    assert table_metadata(examples)["qbreak_version"] == __version__
    assert all(len(r) == config["seq_len"] and r[0] == 0 for r in examples.column("input_ids").to_pylist())
    assert not set(examples.column("doc_id").to_pylist()) & set(calibration.column("doc_id").to_pylist())
    assert all(t.strip() for t in examples.column("text").to_pylist())


def test_fp_nll_table(tiny_run: Path) -> None:
    nll = read_table(tiny_run / "results" / "nll" / "smollm2-135m" / "fp.arrow")
    assert nll.schema.equals(NLL_SCHEMA, check_metadata=False)
    values = nll.column("nll").to_numpy()
    assert np.isfinite(values).all() and 0.5 < values.mean() < 8  # a real LM on Wikipedia text
    assert values.std() > 0.05  # examples differ
    assert set(nll.column("method").to_pylist()) == {"fp"}
    assert nll.column("n_scored").to_pylist() == [31] * nll.num_rows
    for name in ("fetch_model", "make_examples", "score_model"):  # passes.fuse_methods: one model pass
        assert list((tiny_run / "benchmarks" / name).rglob("*.tsv")), name
        assert list((tiny_run / "logs" / name).rglob("*.log")), name


def test_second_run_has_nothing_to_do(tiny_run: Path) -> None:
    proc = run_snakemake(tiny_run, "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_quantized_models_and_errors(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    fp = read_table(tiny_run / "results" / "nll" / "smollm2-135m" / "fp.arrow")
    errors = read_table(tiny_run / "results" / "errors" / "smollm2-135m.arrow")
    assert errors.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    assert errors.num_rows == fp.num_rows * len(config["methods"])
    for name, entry in config["methods"].items():
        quant = json.loads((tiny_run / "results" / "models" / "smollm2-135m" / name / "quant.json").read_text())
        assert (quant["kind"], quant["bits"], quant["group_size"]) == (entry["kind"], entry["bits"], entry["group_size"])
        rows = errors.filter(pc.equal(errors["method"], name))
        nll_q = read_table(tiny_run / "results" / "nll" / "smollm2-135m" / f"{name}.arrow").column("nll").to_numpy()
        np.testing.assert_allclose(rows["nll_q"].to_numpy(), nll_q)
        np.testing.assert_allclose(rows["error"].to_numpy(), nll_q - fp.column("nll").to_numpy())
    calibration = json.loads((tiny_run / "results/models/smollm2-135m/gptq-w3-g64/quant.json").read_text())["calibration"]
    assert calibration["file"] == "results/corpus/tinycal/smollm2-135m/calibration.arrow"
    tinycal = read_table(tiny_run / calibration["file"])
    assert tinycal.num_rows == calibration["samples"] == 4
    assert set(tinycal.column("doc_id").to_pylist()) <= {f"cal{i}" for i in range(6)}
    rtn3 = errors.filter(pc.equal(errors["method"], "rtn-w3-g64"))["error"].to_numpy()
    assert rtn3.mean() > 0.05  # 3-bit RTN hurts the real model


def test_quantize_logs_keep_llm_compressors_output(tiny_run: Path) -> None:
    """llm-compressor logs to stdout (loguru): its lines belong in the job's log, not the terminal."""
    loguru_line = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+ \| \w+ \| [A-Z]+ - ", re.MULTILINE)
    assert loguru_line.search((tiny_run / "logs" / "quantize_model" / "smollm2-135m" / "gptq-w3-g64.log").read_text())
    assert not loguru_line.search((tiny_run / "snakemake.out").read_text())


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, rule -> count."""
    lines = stdout.split("Job stats:")[1].splitlines()
    counts = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_a_config_with_its_keys_in_another_order_reruns_nothing(tiny_run: Path) -> None:
    """Snakemake compares params as written, key order included (qbreak.config.canonical_order)."""

    def reverse(value):  # noqa: ANN001, ANN202
        if isinstance(value, dict):
            return {key: reverse(value[key]) for key in reversed(list(value))}
        return [reverse(item) for item in value] if isinstance(value, list) else value

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    reordered = reverse(config)
    for key in ("models", "methods"):  # their entries' order is the runs' order: kept
        reordered[key] = {name: reverse(entry) for name, entry in config[key].items()}
    (tiny_run / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    assert (tiny_run / "reordered.yaml").read_text() != (tiny_run / "config.yaml").read_text()
    proc = run_snakemake(tiny_run, "-n", "--cores", "2", configfile="reordered.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_editing_one_method_requantizes_only_that_method(tiny_run: Path) -> None:
    """The model pass (FP and every method side by side) reruns; no other method is requantized."""
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["methods"]["nf4-g64"]["group_size"] = 32
    (tiny_run / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tiny_run, "-n", "--cores", "2", configfile="edited.yaml")
    assert job_counts(proc.stdout) == {
        "all": 1,
        "quantize_model": 1,
        "score_model": 1,
        "collect_errors": 1,
        "analyze_errors": 1,
        "plot_errors": 1,
        # D_large / D_ctrl may change with one method's errors: the subset passes of every method rerun
        "logit_lens": 4,
        "restore_layers": 3,
        "analyze_residuals": 1,
        "plot_residuals": 1,
        "patch_activations": 1,
        "summarize_patching": 1,
        "report_overview": 1,
    }
    outputs = [line for line in proc.stdout.splitlines() if line.strip().startswith("output:")]
    for other in ("gptq-w3-g64", "rtn-w3-g64"):
        assert not [line for line in outputs if f"models/smollm2-135m/{other}" in line]
    assert [line for line in outputs if "models/smollm2-135m/nf4-g64" in line]
    assert [line for line in outputs if "kl/smollm2-135m/nf4-g64.arrow" in line]


def test_more_examples_rerun_everything_downstream_of_the_examples(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["corpus"]["n_examples"] += 2
    (tiny_run / "more.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(run_snakemake(tiny_run, "-n", "--cores", "2", configfile="more.yaml").stdout)
    assert "fetch_model" not in counts  # upstream of the examples
    assert counts["make_examples"] == 1 and counts["score_model"] == 1
    assert "quantize_model" not in counts  # RTN/NF are data-free, GPTQ calibrates on its own corpus
    assert counts["patch_activations"] == 1
    assert counts["report_overview"] == 1


def repository_copy(tmp_path: Path) -> Path:
    """A copy of the workflow and its package, whose code a test may edit."""
    import shutil

    copy = tmp_path / "repo"
    copy.mkdir()
    for part in ("Snakefile", "rules", "schemas", "report", "workflow_scripts", "envs", "profiles", "src"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, copy / part)
    return copy


def dry_run_after_editing(copy: Path, module: str, tiny_run: Path) -> str:
    """Append a function to qbreak `module` (a path under src/qbreak) in `copy`, then the stdout of
    a dry run of the copy's workflow on the tiny run's results."""
    import os

    path = copy / "src" / "qbreak" / module
    path.write_text(path.read_text() + "\n\ndef _edited() -> int:\n    return 1\n")
    proc = subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "2", "--snakefile", str(copy / "Snakefile"), "--directory", str(tiny_run),
         "--configfile", str(tiny_run / "config.yaml")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(copy / "src")}, check=True,
    )
    return proc.stdout


def test_editing_one_stage_code_reruns_that_stage(tiny_run: Path, tmp_path: Path) -> None:
    """A copy of the repository whose logit-lens code differs: only the lens jobs and what reads them rerun."""
    stdout = dry_run_after_editing(repository_copy(tmp_path), "lens.py", tiny_run)
    assert job_counts(stdout) == {
        "all": 1, "logit_lens": 4, "restore_layers": 3, "analyze_residuals": 1, "plot_residuals": 1,
        "report_overview": 1,
    }


def test_editing_one_quantizer_requantizes_only_its_kind(tiny_run: Path, tmp_path: Path) -> None:
    """A copy of the repository whose GPTQ quantizer differs: GPTQ requantizes, RTN and NF do not; an
    edit of the shared quantize code requantizes every method."""
    copy = repository_copy(tmp_path)

    def quantized_after_editing(module: str) -> list[str]:
        stdout = dry_run_after_editing(copy, f"quantize/{module}", tiny_run)
        return sorted(re.findall(r"output: results/models/smollm2-135m/([\w-]+)\n", stdout))

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert quantized_after_editing("gptq.py") == ["gptq-w3-g64"]
    assert quantized_after_editing("base.py") == sorted(config["methods"])


def test_kl_tables(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    for name in config["methods"]:
        kl = read_table(tiny_run / "results" / "kl" / "smollm2-135m" / f"{name}.arrow")
        assert kl.schema.equals(KL_SCHEMA, check_metadata=False)
        assert kl.num_rows == config["corpus"]["n_examples"]
        exact, topk = kl.column("kl_fp_q").to_numpy(), kl.column("kl_fp_q_topk").to_numpy()
        assert (exact > 0).all() and (kl.column("kl_q_fp").to_numpy() > 0).all()
        assert (topk <= exact * (1 + 1e-4) + 1e-7).all() and (topk > 0.5 * exact).all()


def test_error_analysis_outputs(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    methods, n = list(config["methods"]), config["corpus"]["n_examples"]
    folder = tiny_run / "results" / "analysis" / "smollm2-135m"
    corr = read_table(folder / "correlations.arrow")
    assert corr.schema.equals(CORRELATIONS_SCHEMA, check_metadata=False)
    measures = corr.column("measure").to_pylist()
    pairs = len(methods) * (len(methods) - 1) // 2
    assert (measures.count("error"), measures.count("kl_vs_error")) == (pairs, len(methods))
    assert set(corr.column("n").to_pylist()) == {n}
    lo, r, hi = (corr.column(c).to_numpy() for c in ("pearson_lo", "pearson", "pearson_hi"))
    assert (lo <= r + 1e-12).all() and (r <= hi + 1e-12).all()
    summary = read_table(folder / "correlation_summary.arrow")
    assert summary.schema.equals(CORRELATION_SUMMARY_SCHEMA, check_metadata=False)
    assert "cross_family" in summary.column("group").to_pylist()
    overlap = read_table(folder / "overlap.arrow")
    assert overlap.schema.equals(OVERLAP_SCHEMA, check_metadata=False) and overlap.num_rows == pairs
    selection = read_table(folder / "selection.arrow")
    assert selection.schema.equals(SELECTION_SCHEMA, check_metadata=False) and selection.num_rows == n
    sets = selection.column("set").to_pylist()
    assert 1 <= sets.count("large") == sets.count("ctrl")
    errors = read_table(tiny_run / "results" / "errors" / "smollm2-135m.arrow")
    worst = max(range(n), key=lambda i: selection.column("mean_error")[i].as_py())
    assert selection.column("rank")[worst].as_py() == 1
    assert pc.max(errors["error"]).as_py() >= selection.column("mean_error")[worst].as_py()
    markdown = (folder / "breaking_examples.md").read_text()
    examples = read_table(tiny_run / "results" / "corpus" / "wikipedia-vital" / "smollm2-135m" / "examples.arrow")
    worst_text = examples.column("text")[examples.column("example_id").to_pylist().index(
        selection.column("example_id")[worst].as_py())].as_py()
    assert " ".join(worst_text.split())[:30] in markdown
    for name in ("error_correlations", "error_scatter", "error_distributions"):
        for ext in ("png", "svg"):
            assert (tiny_run / "results" / "figures" / "smollm2-135m" / f"{name}.{ext}").stat().st_size > 1000


def test_residual_outputs(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    methods, n = list(config["methods"]), config["corpus"]["n_examples"]
    results = tiny_run / "results"
    n_layers = 30
    for method in ["fp", *methods]:
        residuals = read_table(results / "residuals" / "smollm2-135m" / f"{method}.arrow")
        assert residuals.schema.equals(RESIDUALS_SCHEMA, check_metadata=False)
        assert residuals.num_rows == n * n_layers * 3
        assert (residuals.column("norm").to_numpy() > 0).all() and (residuals.column("kurtosis").to_numpy() > 1).all()
    for method in methods:
        amp = read_table(results / "amplification" / "smollm2-135m" / f"{method}.arrow")
        assert amp.schema.equals(AMPLIFICATION_SCHEMA, check_metadata=False) and amp.num_rows == n * n_layers
        assert (amp.column("mlp_mse").to_numpy() > 0).all()
    folder = results / "analysis" / "smollm2-135m"
    expected = {
        "norm_error_corr": (NORM_CORR_SCHEMA, (len(methods) + 1) * n_layers * 2),
        "amplification": (AMPLIFICATION_SUMMARY_SCHEMA, len(methods) * n_layers),
        "gamma_outliers": (GAMMA_OUTLIERS_SCHEMA, n_layers * 5),
        "predictor": (PREDICTOR_SCHEMA, (len(methods) + 1) * 2),
    }
    for name, (schema, rows) in expected.items():
        table = read_table(folder / f"{name}.arrow")
        assert table.schema.equals(schema, check_metadata=False) and table.num_rows == rows, name
    lens = read_table(folder / "logit_lens.arrow")
    assert lens.schema.equals(LENS_SUMMARY_SCHEMA, check_metadata=False)
    assert set(lens.column("method").to_pylist()) == {"fp", *methods}
    assert set(lens.column("set").to_pylist()) == {"large", "ctrl"}
    restore = read_table(folder / "restore_layers.arrow")
    assert restore.schema.equals(RESTORE_SUMMARY_SCHEMA, check_metadata=False)
    rows = restore.to_pylist()
    assert {r["restored"] for r in rows} == {"none (fp)", "none (quantized)", "23-29"}
    for method in methods:
        ppl = {(r["set"], r["restored"]): r["perplexity"] for r in rows if r["method"] == method}
        assert ppl[("large", "none (fp)")] < ppl[("large", "none (quantized)")]
    for name in ("residual_norms", "norm_error_correlation", "logit_lens", "amplification", "restore_layers"):
        assert (results / "figures" / "smollm2-135m" / f"{name}.png").stat().st_size > 1000


def test_patching_outputs(tiny_run: Path) -> None:
    results = tiny_run / "results"
    patching = read_table(results / "patching" / "smollm2-135m" / "rtn-w3-g64.arrow")
    assert patching.schema.equals(PATCHING_SCHEMA, check_metadata=False)
    keys = set(zip(patching.column("site").to_pylist(), patching.column("layers").to_pylist(), strict=True))
    sites = ("attn", "gate", "up", "down", "gate_input")
    assert keys == {("none", "none"), ("gate_weights", "15-29"), ("resid", "15-29")} | {
        (site, label) for site in sites for label in ("15-29", "28", "29")
    }
    selection = read_table(results / "analysis" / "smollm2-135m" / "selection.arrow").to_pylist()
    subset = {r["example_id"] for r in selection if r["set"] in ("large", "ctrl")}
    assert set(patching.column("example_id").to_pylist()) == subset
    none = patching.filter(pc.equal(patching["site"], "none"))
    nll = read_table(results / "nll" / "smollm2-135m" / "rtn-w3-g64.arrow").to_pylist()
    by_id = {r["example_id"]: r["nll"] for r in nll}
    for example_id, value in zip(none.column("example_id").to_pylist(), none.column("nll").to_pylist(), strict=True):
        assert value == pytest.approx(by_id[example_id], abs=1e-4)  # patch nothing = the quantized model
    summary = read_table(results / "analysis" / "smollm2-135m" / "patching_table.arrow")
    assert summary.schema.equals(PATCH_SUMMARY_SCHEMA, check_metadata=False)
    resid = [r for r in summary.to_pylist() if r["site"] == "resid" and r["set"] == "large"]
    # the FP residual at every upper layer, the last included, is the FP model's output: the whole gap
    assert resid and resid[0]["recovered"] == pytest.approx(1.0, abs=1e-3)
    markdown = (results / "analysis" / "smollm2-135m" / "patching_table.md").read_text()
    assert "| quantized |" in markdown and "| gate_input | 15-29 |" in markdown
    assert markdown.rstrip().endswith(UP_SITE_NOTE)  # the tiny run patches `up`
    for name in ("patching_sites", "patching_sweep"):
        assert (results / "figures" / "smollm2-135m" / f"{name}.svg").stat().st_size > 1000


REPORTED_FIGURES = [
    "error_correlations", "error_scatter", "error_distributions", "residual_norms", "norm_error_correlation",
    "logit_lens", "amplification", "restore_layers", "patching_sites", "patching_sweep",
]


def test_report_collects_every_figure_and_page_and_renders(tiny_run: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess

    import matplotlib.image

    run_snakemake(tiny_run, "--report", "results/report.html")
    report = (tiny_run / "results" / "report.html").read_text()
    for name in [*(f"{f}.png" for f in REPORTED_FIGURES), "overview.html", "breaking_examples.html",
                 "patching_table.html"]:
        assert name in report, name
    assert "qbreak: which inputs does low-bit weight-only quantization break" in report
    overview = (tiny_run / "results" / "report" / "smollm2-135m" / "overview.html").read_text()
    assert "<table>" in overview and "Configuration used" in overview and "rtn-w3-g64" in overview
    assert "<h2>" in (tiny_run / "results" / "analysis" / "smollm2-135m" / "breaking_examples.html").read_text()
    # it renders: headless Chromium (Debian's chromium, installed by .ci/run) takes a screenshot
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install chromium; .ci/run does)"
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,900", "--virtual-time-budget=5000", f"--screenshot={shot}",
         (tiny_run / "results" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1280) and pixels[..., :3].std() > 0.05  # not a blank page


def test_analysis_rules_run_without_torch_and_reproduce_their_outputs(tiny_run: Path, tmp_path: Path) -> None:
    """The rules of envs/analysis.yaml rerun with torch unimportable, giving byte-identical outputs."""
    import os

    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_MODEL_LIBRARIES)
    results = tiny_run / "results"
    outputs = sorted(p for folder in ("analysis", "figures", "report") for p in (results / folder).rglob("*") if p.is_file())
    assert len(outputs) > 30
    before = {p: p.read_bytes() for p in outputs}
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    torch_free = ["plot_errors", "analyze_residuals", "plot_residuals", "summarize_patching", "report_overview"]
    proc = run_snakemake(tiny_run, "--cores", "2", "--forcerun", *torch_free, env=env)
    assert all(f"rule {name}:" in proc.stdout + proc.stderr for name in torch_free)
    # analyze_errors alone (its downstream model passes need torch), then bring the rest up to date
    run_snakemake(tiny_run, "--cores", "2", "--forcerun", "analyze_errors", "--until", "analyze_errors", env=env)
    run_snakemake(tiny_run, "--cores", "1", "--touch")
    assert {p: p.read_bytes() for p in outputs} == before
    proc = run_snakemake(tiny_run, "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_per_method_layout_writes_the_fused_runs_tables(tiny_run: Path, tmp_path: Path) -> None:
    """passes.fuse_methods: false through the real workflow (score_fp, one compare_to_fp per method) in
    a fresh folder: every model-pass table equals the fused run's (score_model): the same rows and
    integers, floats within conftest.RUN_TO_RUN_RTOL (bit-identical in every run outside CI's suite)."""
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["passes"] = {"fuse_methods": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    files = ["residuals/smollm2-135m/fp_dims.arrow"] + [
        f"{kind}/smollm2-135m/{method}.arrow" for kind in ("nll", "residuals") for method in ["fp", *config["methods"]]
    ] + [f"{kind}/smollm2-135m/{method}.arrow" for kind in ("kl", "amplification") for method in config["methods"]]
    run_snakemake(tmp_path, "--cores", "2", *(f"results/{name}" for name in files))
    assert not (tmp_path / "benchmarks" / "score_model").exists()
    assert len(list((tmp_path / "benchmarks" / "compare_to_fp").rglob("*.tsv"))) == len(config["methods"])
    for name in files:
        ours, fused = tmp_path / "results" / name, tiny_run / "results" / name
        if table_mismatch(ours, fused) is not None:  # not bit-identical: allowed within float rounding
            problem = table_mismatch(ours, fused, RUN_TO_RUN_RTOL, RUN_TO_RUN_ATOL)
            assert problem is None, problem
            warnings.warn(f"per-method layout = fused run only within float rounding: {table_difference(ours, fused)} "
                          f"({float_environment_resets(tiny_run, tmp_path)})")
