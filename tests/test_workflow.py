"""The real Snakefile end to end on the tiny config, in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml

from qbreak import __version__
from qbreak.io import ERRORS_SCHEMA, EXAMPLES_SCHEMA, NLL_SCHEMA, read_table, table_metadata
from tests.conftest import run_snakemake, tiny_workflow_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(bundled_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_workflow_config(bundled_model_dir)))
    run_snakemake(workdir, "--cores", "2")
    return workdir


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
    for name in ("fetch_model", "make_examples", "compute_nll"):
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


def test_editing_one_method_reruns_only_its_branch(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["methods"]["nf4-g64"]["group_size"] = 32
    (tiny_run / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tiny_run, "-n", "--cores", "2", configfile="edited.yaml")
    assert job_counts(proc.stdout) == {"all": 1, "collect_errors": 1, "compute_nll": 1, "quantize_model": 1}
    assert "method=gptq-w3-g64" not in proc.stdout
    assert "nf4-g64" in proc.stdout and "wildcards: model=smollm2-135m, method=rtn-w3-g64" not in proc.stdout
