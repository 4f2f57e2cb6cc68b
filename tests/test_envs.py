"""Software environments: every rule names a conda env, and the envs pin what pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import BLOCK_MODEL_LIBRARIES

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"


def pyproject_pins() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]), set(project["optional-dependencies"]["models"])


def env_pins(name: str) -> tuple[set[str], list[str]]:
    """The `name==version` pins of envs/<name>.yaml's pip section, and its other pip lines."""
    env = yaml.safe_load((ENVS / f"{name}.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {p for p in pip if "==" in p}, [p for p in pip if "==" not in p]


def rule_envs() -> dict[str, str]:
    """rule name -> the env file its `conda:` directive names (None if it has none)."""
    envs = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for block in re.split(r"(?m)^(?=rule )", path.read_text())[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            match = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
            envs[name] = match.group(1) if match else None
    return envs


def test_every_rule_has_an_existing_conda_env() -> None:
    envs = rule_envs()
    assert len(envs) > 15
    missing = [name for name, env in envs.items() if env is None and name != "all"]
    assert not missing, f"rules without conda: {missing}"
    for name, env in envs.items():
        if env is not None:
            assert (REPO / "rules" / env).resolve().is_file(), f"rule {name}: {env} does not exist"


def test_model_rules_use_the_models_env_and_the_rest_the_light_one() -> None:
    envs = {name: Path(env).name for name, env in rule_envs().items() if env}
    torch_free = {"analyze_errors", "plot_errors", "analyze_residuals", "plot_residuals", "summarize_patching",
                  "report_overview"}
    assert {n for n, e in envs.items() if e == "analysis.yaml"} == torch_free
    assert {e for n, e in envs.items() if n not in torch_free} == {"models.yaml"}


@pytest.mark.parametrize(("env", "extras"), [("analysis", False), ("models", True)])
def test_env_pins_equal_pyproject(env: str, extras: bool) -> None:
    core, models = pyproject_pins()
    pins, other = env_pins(env)
    assert pins == (core | models if extras else core)
    assert other == ["--editable ..[models]" if extras else "--editable .."]
    if extras:  # torch first: an unpinned torch from another package would pull a CUDA build
        first = yaml.safe_load((ENVS / "models.yaml").read_text())["dependencies"][-1]["pip"][0]
        assert first == "torch==2.13.0"


def test_analysis_modules_import_without_torch() -> None:
    """What envs/analysis.yaml lacks is never imported by the Snakefile or the analysis jobs' modules."""
    import subprocess
    import sys

    code = BLOCK_MODEL_LIBRARIES + (
        "import qbreak.config, qbreak.models, qbreak.provenance, qbreak.jobs, qbreak.report\n"
        "import qbreak.correlate, qbreak.selection, qbreak.breaking, qbreak.plots\n"
        "import qbreak.residual_analysis, qbreak.residual_plots, qbreak.patching_summary\n"
        "from qbreak.runtime import configure\n"
        "configure(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
