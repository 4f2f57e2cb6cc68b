"""Config errors name the key; Arrow files are written atomically and read with clear errors."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from qbreak import __version__
from qbreak.config import KIND_KEYS, METHOD_KEYS, canonical_order, check_config, check_config_files, load_schema
from qbreak.errors import QbreakError
from qbreak.io import NLL_SCHEMA, atomic_path, read_table, table_metadata, write_table
from tests.conftest import REPO, config_error, run_snakemake

SCHEMA = load_schema(REPO / "schemas" / "config.schema.yaml")
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize("path", ["config.yaml", "tests/workflow/config.yaml", "config/paper.yaml", "config/bundled-full.yaml"])
def test_shipped_configs_are_valid(path: str) -> None:
    check_config(yaml.safe_load((REPO / path).read_text()), SCHEMA)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["corpus"].update(n_exampels=3), "config key corpus.n_exampels: unknown key"),
        (lambda c: c["corpus"].update(seq_len="long"), "config key corpus.seq_len: 'long' is not of type 'integer'"),
        (lambda c: c["runtime"].update(dtype="fp8"), "config key runtime.dtype: 'fp8' is not one of"),
        (lambda c: c.update(modles={}), "config key modles: unknown key"),
        (lambda c: c["models"]["smollm2-135m"].update(path="/x"), "config key models.smollm2-135m: give exactly one"),
        (lambda c: c["corpus"].pop("bundled"), "config key corpus: give exactly one source"),
        (lambda c: c["runtime"].update(device="gpu"), "config key runtime.device: 'gpu' does not match"),
        (lambda c: c["methods"]["gptq-w3-g64"].update(actorder="group"),
         "config key methods.gptq-w3-g64.actorder: 'group' is not one of ['static', 'weight', None]"),
        # cross-references the schema cannot express (config.check_references)
        (lambda c: c["methods"]["rtn-w3-g64"].update(damping=0.1),
         "config key methods.rtn-w3-g64.damping: not an option of kind rtn (its options: bits, group_size, kind, seed, symmetric)"),
        (lambda c: c["methods"]["nf3-g64"].update(symmetric=True), "config key methods.nf3-g64.symmetric: not an option of kind nf"),
        (lambda c: c["methods"]["awq-w3-g64"].update(optimize=False), "config key methods.awq-w3-g64.optimize: not an option of kind awq"),
        (lambda c: c["patching"].update(methods=["nope"]), "config key patching.methods: 'nope' is not a configured method"),
        (lambda c: c.update(analysis={"methods": ["gptq-w3-g64", "nope"]}), "config key analysis.methods: 'nope' is not a configured method"),
        (lambda c: c["methods"]["gptq-w3-g64"].update(calibration={"name": c["corpus"]["name"], "path": "/x.txt"}),
         "config key methods.gptq-w3-g64.calibration.name: 'wikipedia-vital' is the main corpus's name"),
        (lambda c: [c["methods"][m].update(calibration={"name": "c4", "path": p}) for m, p in
                    (("gptq-w3-g64", "/a.txt"), ("awq-w3-g64", "/b.txt"))],
         "config key methods.awq-w3-g64.calibration.name: 'c4' names another source in methods.gptq-w3-g64.calibration"),
    ],
)
def test_config_errors_name_the_key(edit, expected: str) -> None:
    config = copy.deepcopy(DEFAULT)
    edit(config)
    with pytest.raises(QbreakError) as info:
        check_config(config, SCHEMA)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_canonical_order_sorts_every_mapping_but_the_runs_models_and_methods() -> None:
    config = {"runtime": {"dtype": "float32", "device": "cpu"},
              "methods": {"z-rtn": {"kind": "rtn", "bits": 3, "calibration": {"path": "c", "name": "n"}},
                          "a-nf": {"kind": "nf", "bits": 4}},
              "corpus": {"seq_len": 8, "bundled": "x"}}
    canonical = canonical_order(config)
    assert list(canonical) == ["corpus", "methods", "runtime"]
    assert list(canonical["methods"]) == ["z-rtn", "a-nf"]  # the runs' order
    assert list(canonical["methods"]["z-rtn"]) == ["bits", "calibration", "kind"]
    assert list(canonical["methods"]["z-rtn"]["calibration"]) == ["name", "path"]
    assert list(canonical["runtime"]) == ["device", "dtype"] and canonical == config


def test_snakemake_refuses_a_config_typo_naming_the_key(tmp_path: Path) -> None:
    config = copy.deepcopy(DEFAULT)
    config["corpus"]["n_exampels"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert config_error(proc).startswith("config key corpus.n_exampels: unknown key")


def test_shared_calibration_corpus_with_one_source_is_fine() -> None:
    config = copy.deepcopy(DEFAULT)
    for method in ("gptq-w3-g64", "awq-w3-g64"):
        config["methods"][method]["calibration"] = {"name": "c4", "path": "/data/c4.txt"}
    check_config(config, SCHEMA)
    config["methods"]["awq-w3-g64"]["calibration"].update(text_column="text", subset=None)  # the defaults, spelt out
    check_config(config, SCHEMA)


def test_every_method_key_of_the_schema_belongs_to_some_kind() -> None:
    entry = SCHEMA["properties"]["methods"]["additionalProperties"]
    assert set(KIND_KEYS) == set(entry["properties"]["kind"]["enum"])
    assert METHOD_KEYS.union(*KIND_KEYS.values()) == set(entry["properties"])


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("methods:\n  a:\n    kind: rtn\n  a:\n    kind: nf\n", 4, "a"),  # one method twice
        ("methods: {}\ncorpus: {}\nmethods: {}\n", 3, "methods"),  # a second block would replace the first
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(QbreakError) as info:
        check_config_files([path])
    assert str(info.value) == f"{path}: line {line}: key '{key}' given twice in one mapping"


def test_config_files_with_merge_keys_or_tab_indented_json_are_read(tmp_path: Path) -> None:
    merged = tmp_path / "merge.yaml"
    merged.write_text("methods:\n  a: &a {kind: rtn, bits: 3}\n  b:\n    <<: *a\n    bits: 4\n")
    tabs = tmp_path / "tabs.json"
    tabs.write_text(json.dumps(DEFAULT, indent="\t"))
    check_config_files([merged, tabs])
    twice = tmp_path / "twice.json"
    twice.write_text('{"methods": {}, "methods": {}}')
    with pytest.raises(QbreakError, match=r"twice\.json: key 'methods' given twice in one object$"):
        check_config_files([twice])
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods:\n  a: [1, 2\n")
    with pytest.raises(QbreakError, match=r"broken\.yaml: line 3: not valid YAML \(expected ',' or '\]', but got"):
        check_config_files([broken])


def test_make_run_checks_its_config_file_before_snakemake(tmp_path: Path) -> None:
    """Snakemake reports a YAML error in a --configfile without the file's name; `make run` checks the
    file first with `python -m qbreak.config`, which names it (one line, exit status 1)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods:\n  a: [1, 2\n")
    control = tmp_path / "control.yaml"
    control.write_text("methods:\n  a: 1\x07\n")
    json_file = tmp_path / "broken.json"
    json_file.write_text('{"methods": [1, 2}\n')
    missing = tmp_path / "missing.yaml"
    cases = [
        ([broken], f"{broken}: line 3: not valid YAML"),
        ([control], f"{control}: not valid YAML (unacceptable character #x0007"),
        ([json_file], f"{json_file}: line 1: not valid JSON or YAML"),
        ([missing], f"{missing}: cannot read the config file"),
        ([], "no config file given"),
    ]
    for paths, message in cases:
        command = [sys.executable, "-m", "qbreak.config", *map(str, paths)]
        proc = subprocess.run(command, capture_output=True, text=True)
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith(f"qbreak error: {message}")
    ok = subprocess.run([sys.executable, "-m", "qbreak.config", str(REPO / "config.yaml")], capture_output=True)
    assert ok.returncode == 0 and not ok.stderr
    recipe = subprocess.run(
        ["make", "-n", "run", f"CONFIG={broken}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    check = next(i for i, line in enumerate(recipe) if "-m qbreak.config" in line)
    assert str(broken) in recipe[check]
    assert check < next(i for i, line in enumerate(recipe) if "snakemake" in line)


def test_snakemake_refuses_a_method_given_twice(tmp_path: Path) -> None:
    text = yaml.safe_dump(DEFAULT, sort_keys=False)
    duplicate = "methods:\n  rtn-w3-g64:\n    kind: nf\n    bits: 4\n    group_size: 32\n"
    (tmp_path / "config.yaml").write_text(text.replace("methods:\n", duplicate, 1))
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert re.fullmatch(r".*config\.yaml: line \d+: key 'rtn-w3-g64' given twice in one mapping", config_error(proc))


def test_another_config_file_replaces_config_yaml_as_the_readme_says(tmp_path: Path) -> None:
    """README: `--configfile config/paper.yaml --replace-workflow-config`; without the flag Snakemake
    merges paper.yaml over config.yaml (the Snakefile's configfile), and the run stops saying so."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "paper.yaml").write_text((REPO / "config" / "paper.yaml").read_text())
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", configfile="paper.yaml", check=False)
    message = config_error(proc)
    assert message.startswith("config key corpus: give exactly one source")
    assert message.endswith("add --replace-workflow-config to use only the last)")
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", "--replace-workflow-config", configfile="paper.yaml")
    assert "model=llama-3-70b" in proc.stdout and "smollm2" not in proc.stdout


@pytest.mark.parametrize(
    ("section", "key", "values"),
    [
        ("residuals", "lens_layers", [[0, 1], [1], [2], [-1]]),  # against a real 2-layer model
        ("patching", "sweep_layers", [[0, 11], [12], [-1]]),
        ("residuals", "restore_ranges", [[[0, 11]], [[-3, -1]], [[-12, 11]], [[-13, 0]], [[5, 12]], [[6, 5]]]),
        ("patching", "ranges", [[[0, 11]], [[-3, -1]], [[-13, 0]], [[5, 12]], [[6, 5]]]),
    ],
)
def test_early_layer_check_refuses_what_the_jobs_refuse(section: str, key: str, values: list) -> None:  # noqa: ANN001
    """check_layer_settings (before any job) accepts and refuses exactly what the jobs do once the
    model is loaded (the lens attaching to a model, lens.parse_layer_ranges, patching.build_patches)."""
    from qbreak.config import check_layer_settings
    from qbreak.lens import LogitLensStatistic, parse_layer_ranges
    from qbreak.patching import build_patches
    from tests.conftest import make_tiny_llama

    n_layers = 2 if key == "lens_layers" else 12

    def lens_layers(layers: list[int]) -> None:  # checked when the lens attaches to the model
        with LogitLensStatistic("m", "fp", layers).attach(make_tiny_llama()):
            pass

    job = {
        "lens_layers": lens_layers,
        "sweep_layers": lambda v: build_patches(n_layers, ["attn"], v, None),
        "restore_ranges": lambda v: parse_layer_ranges(v, n_layers, "residuals.restore_ranges"),
        "ranges": lambda v: build_patches(n_layers, ["attn"], None, v),
    }[key]
    refused = []
    for value in values:
        outcomes = []
        for check in (lambda v: check_layer_settings({section: {key: v}}, "m", n_layers), job):
            try:
                check(value)
                outcomes.append(True)
            except QbreakError:
                outcomes.append(False)
        assert outcomes[0] == outcomes[1], (key, value, outcomes)
        refused.append(not outcomes[0])
    assert any(refused) and not all(refused)  # each key has cases of both kinds


def test_a_layer_setting_beyond_the_model_stops_the_dry_run(tmp_path: Path) -> None:
    config = copy.deepcopy(DEFAULT)
    config["residuals"]["lens_layers"] = [5, 99]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert (config_error(proc)
            == "config key residuals.lens_layers: layer 99 is not within layers 0..29 (model smollm2-135m)")


def test_a_group_size_that_does_not_divide_a_width_stops_the_dry_run(tmp_path: Path) -> None:
    """SmolLM2-135M's Linears take 576 (hidden, attention) or 1536 (MLP) inputs."""
    config = copy.deepcopy(DEFAULT)
    for group, width, source in ((100, 576, "hidden_size"), (144, 1536, "intermediate_size")):
        config["methods"]["rtn-w3-g64"]["group_size"] = group
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        proc = run_snakemake(tmp_path, "-n", "--cores", "1", check=False)
        assert config_error(proc) == (f"config key methods.rtn-w3-g64.group_size: {group} does not divide the "
                                      f"input width {width} ({source}) of model smollm2-135m")
    config["methods"]["rtn-w3-g64"]["group_size"] = 192  # divides both
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path, "-n", "--cores", "1")


def test_paper_config_builds_its_dag(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text((REPO / "config" / "paper.yaml").read_text())
    proc = run_snakemake(tmp_path, "-n", "--cores", "1")
    for rule in ("fetch_model", "score_fp", "compare_to_fp", "analyze_errors", "analyze_residuals", "patch_activations"):
        assert rule in proc.stdout, rule
    assert "score_model" not in proc.stdout  # passes.fuse_methods: false, one FP + method job per method
    # model jobs are sized from the model (bf16 weights, two copies side by side) and ask for a GPU (cuda)
    jobs = proc.stdout.split("\n\n")
    compare_70b = next(j for j in jobs if "rule compare_to_fp:" in j and "model=llama-3-70b" in j)
    mem = int(re.search(r"mem_mb=(\d+)", compare_70b).group(1))
    assert 2 * 70553706496 * 2 / 2**20 < mem < 2 * 70553706496 * 2 / 2**20 + 10_000
    assert "gpu=1" in compare_70b
    analysis = next(j for j in jobs if "rule analyze_errors:" in j)
    assert "gpu=" not in analysis and "mem_mb=2000" in analysis


@pytest.mark.parametrize("fuse", [True, False])
def test_fused_or_per_method_model_passes(tmp_path: Path, fuse: bool) -> None:
    """passes.fuse_methods: one score_model job per model holding every model, or score_fp plus one
    compare_to_fp job (two models) per method; both write the same files."""
    config = yaml.safe_load((REPO / "tests" / "workflow" / "config.yaml").read_text())
    config["passes"] = {"fuse_methods": fuse}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, "-n", "--cores", "2", "--printshellcmds", "results/errors/smollm2-135m.arrow")
    counts = {rule: proc.stdout.count(f"rule {rule}:") for rule in ("score_model", "score_fp", "compare_to_fp")}
    methods = len(config["methods"])
    assert counts == ({"score_model": 1, "score_fp": 0, "compare_to_fp": 0} if fuse else
                      {"score_model": 0, "score_fp": 1, "compare_to_fp": methods})
    for method in ["fp", *config["methods"]]:
        assert f"results/nll/smollm2-135m/{method}.arrow" in proc.stdout
    if fuse:  # every model's float32 weights (the bundled 135M) plus 7000 MB
        job = proc.stdout.split("rule score_model:")[1]
        assert int(re.search(r"mem_mb=(\d+)", job).group(1)) == int((1 + methods) * 134_515_008 * 4 / 2**20 + 7000)


def nll_table() -> pa.Table:
    return pa.table(
        {"example_id": [0, 1], "model": ["m", "m"], "method": ["fp", "fp"], "nll": [1.5, 2.5],
         "n_tokens": [8, 8], "n_scored": [7, 7]}
    )


def test_write_table_roundtrip_with_schema_and_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "nll.arrow"
    write_table(nll_table(), path, NLL_SCHEMA, {"model": "m"})
    table = read_table(path, NLL_SCHEMA)
    assert table.schema.equals(NLL_SCHEMA, check_metadata=False)
    assert table_metadata(table) == {"qbreak_version": __version__, "model": "m"}
    assert [p.name for p in path.parent.iterdir()] == ["nll.arrow"]  # no temporary left behind


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "out.arrow"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a table")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_missing_arrow_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.arrow"
    write_table(nll_table(), bad)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(QbreakError, match=r"bad\.arrow: not a readable Arrow IPC file"):
        read_table(bad)
    with pytest.raises(QbreakError, match=r"missing\.arrow: file not found"):
        read_table(tmp_path / "missing.arrow")
    write_table(nll_table().drop_columns(["nll"]), tmp_path / "narrow.arrow")
    with pytest.raises(QbreakError, match=r"narrow\.arrow: missing columns \['nll'\]"):
        read_table(tmp_path / "narrow.arrow", NLL_SCHEMA)


def test_an_arrow_column_of_the_wrong_type_or_with_nulls_is_named(tmp_path: Path) -> None:
    table = nll_table()
    texts = table.set_column(table.schema.get_field_index("nll"), "nll", pa.array(["abc"] * table.num_rows))
    with pa.ipc.new_file(str(tmp_path / "text.arrow"), texts.schema) as writer:
        writer.write_table(texts)
    with pytest.raises(QbreakError) as info:
        read_table(tmp_path / "text.arrow", NLL_SCHEMA)
    assert str(info.value).startswith(f"{tmp_path / 'text.arrow'}: column 'nll' is string, not double (")
    assert "\n" not in str(info.value)
    ids = pa.array([None] + list(range(1, table.num_rows)), pa.int32())
    nulls = table.set_column(0, pa.field("example_id", pa.int32()), ids)
    with pa.ipc.new_file(str(tmp_path / "nulls.arrow"), nulls.schema) as writer:
        writer.write_table(nulls)
    with pytest.raises(QbreakError, match=r"nulls\.arrow: column 'example_id' has 1 null value\(s\), where none may be$"):
        read_table(tmp_path / "nulls.arrow", NLL_SCHEMA)


def test_source_hash_of_one_function_ignores_the_rest_of_its_module(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from qbreak import provenance

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "jobs.py").write_text("def a():\n    return 1\n\n\ndef b():\n    return 2\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    whole, only_a = provenance.source_hash("jobs"), provenance.source_hash("jobs:a")
    (package / "jobs.py").write_text("def a():\n    return 1\n\n\ndef b():\n    return 3\n")
    assert provenance.source_hash("jobs:a") == only_a
    assert provenance.source_hash("jobs") != whole
    (package / "jobs.py").write_text("def a():\n    return 4\n\n\ndef b():\n    return 3\n")
    assert provenance.source_hash("jobs:a") != only_a
    with pytest.raises(FileNotFoundError, match="defines no top-level 'c'"):
        provenance.source_hash("jobs:c")


def test_source_hash_does_not_follow_the_imports_of_a_leaf_registry(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A quantize job hashes its own quantizer and the registry's source, not the registry's other
    implementations (rules/common.smk, QUANTIZE_CODE)."""
    from qbreak import provenance

    package = tmp_path / "pkg"
    (package / "reg").mkdir(parents=True)
    (package / "reg" / "__init__.py").write_text("from qbreak.reg.a import A\nfrom qbreak.reg.b import B\n")
    (package / "reg" / "a.py").write_text("from qbreak.reg import base\nA = 1\n")
    (package / "reg" / "b.py").write_text("B = 1\n")
    (package / "reg" / "base.py").write_text("S = 1\n")
    (package / "run.py").write_text("from qbreak.reg import A\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)

    def edited(path: str, text: str) -> bool:
        before = provenance.source_hash("reg.a", "run", leaves=frozenset({"reg"}))
        (package / path).write_text(text)
        return provenance.source_hash("reg.a", "run", leaves=frozenset({"reg"})) != before

    assert not edited("reg/b.py", "B = 2\n")  # another implementation
    assert edited("reg/a.py", "from qbreak.reg import base\nA = 2\n")  # its own
    assert edited("reg/base.py", "S = 2\n")  # what its own imports
    assert edited("reg/__init__.py", "from qbreak.reg.a import A\nfrom qbreak.reg.b import B\n\n")  # the registry
    (package / "reg" / "b.py").write_text("B = 3\n")  # without the leaf, b is followed
    before = provenance.source_hash("reg.a", "run")
    (package / "reg" / "b.py").write_text("B = 4\n")
    assert provenance.source_hash("reg.a", "run") != before


def test_source_hash_follows_the_qbreak_modules_a_function_imports(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from qbreak import provenance

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "jobs.py").write_text(
        "def a():\n    from qbreak.helper import x\n    return x\n\n\ndef b():\n    from qbreak import other\n"
    )
    (package / "helper.py").write_text("import numpy\nfrom qbreak.sub import deep\nx = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("y = 1\n")
    (package / "other.py").write_text("z = 1\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)

    def edited(path: str, text: str) -> bool:
        before = provenance.source_hash("jobs:a")
        (package / path).write_text(text)
        return provenance.source_hash("jobs:a") != before

    assert edited("helper.py", "import numpy\nfrom qbreak.sub import deep\nx = 2\n")  # imported by a
    assert edited("sub/deep.py", "y = 2\n")  # imported by what a imports
    assert not edited("other.py", "z = 2\n")  # imported only by b
    assert provenance.source_hash("jobs:b") == provenance.source_hash("jobs:b", "other")  # b imports other
    assert provenance.source_hash("jobs:a") != provenance.source_hash("jobs:a", "other")
    (package / "other.py").write_text("z = 3\n")
    before_b = provenance.source_hash("jobs:b")
    (package / "other.py").write_text("z = 4\n")
    assert provenance.source_hash("jobs:b") != before_b
