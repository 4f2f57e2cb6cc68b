"""The tiny workflow through a real single-node SLURM (profiles/slurm, snakemake-executor-plugin-slurm).

tests/slurm/start-cluster.sh installs Debian's slurmctld/slurmd/munge when missing and starts the
daemons; the test is skipped, with the script's one-line reason, only when they cannot start.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    ANALYSIS_RUN_TO_RUN_ATOL, REPO, RUN_TO_RUN_ATOL, RUN_TO_RUN_RTOL, float_environment_resets, run_snakemake,
    table_difference, table_mismatch, tiny_workflow_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
SLURM_ARGS = (
    "--workflow-profile", str(REPO / "profiles" / "slurm"),
    # the node has 2 CPUs: rules asking for 8 threads would never be scheduled. One thread, as the
    # local run's profiles/default gives every model job: float reductions split over another
    # number of threads round differently, and the results are compared byte for byte.
    "--max-threads", "1",
    "--slurm-init-seconds-before-status-checks", "1",
    "--slurm-keep-successful-logs",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    proc = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start-cluster.sh")],
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        pytest.skip(f"single-node SLURM did not start: {proc.stderr.strip().splitlines()[-1:]}")
    yield
    subprocess.run(["bash", str(REPO / "tests" / "slurm" / "stop-cluster.sh")], capture_output=True, timeout=120,
                   check=False)
    # a link to the stopped controller's config would make every later snakemake start wait ~9 s
    ours = Path(os.environ.get("QBREAK_SLURM_DIR", "/tmp/qbreak-slurm")) / "slurm.conf"
    assert Path("/etc/slurm/slurm.conf").resolve() != ours.resolve(), "stop-cluster.sh left /etc/slurm/slurm.conf linked"


def test_tiny_workflow_through_slurm_equals_the_local_run(
    cluster: None, bundled_model_dir: Path, tiny_run: Path, tmp_path: Path
) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_workflow_config(bundled_model_dir)))
    planned = int(re.search(r"^total\s+(\d+)$", run_snakemake(tmp_path, "-n", *SLURM_ARGS).stdout, re.M).group(1))
    try:
        proc = run_snakemake(tmp_path, *SLURM_ARGS, timeout=1800)
    except subprocess.TimeoutExpired:  # snakemake ignores SIGTERM while it waits on SLURM
        run_snakemake(tmp_path, "--unlock", check=False)
        raise
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr)
    assert len(job_ids) == planned - 1  # every job but the target rule `all` went through sbatch

    # SLURM itself knows them as finished jobs of the rules (finished jobs stay listed for MinJobAge)
    listed = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T|%j"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    states = {line.split("|")[0]: line.split("|")[1] for line in listed}
    assert set(states) == set(job_ids) and set(states.values()) == {"COMPLETED"}
    assert len(list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))) == len(job_ids)

    # the same results as the local run, byte for byte; Arrow tables whose floats differ within
    # conftest.RUN_TO_RUN_RTOL / ANALYSIS_RUN_TO_RUN_ATOL (seen only in CI's full suite) pass with a
    # warning, and then the renderings of the tables (figures, pages) need not be byte-identical
    compared, renderings, near = 0, [], []
    for path in sorted((tiny_run / "results").rglob("*")):
        relative = path.relative_to(tiny_run)
        if path.is_file() and path.suffix in (".arrow", ".safetensors", ".png", ".svg", ".md", ".html"):
            if relative.name in ("report.html", "overview.html"):  # not a workflow output / shows job seconds
                continue
            ours = tmp_path / relative
            compared += 1
            if ours.read_bytes() == path.read_bytes():
                continue
            if path.suffix == ".arrow":
                atol = ANALYSIS_RUN_TO_RUN_ATOL if relative.parts[1] == "analysis" else RUN_TO_RUN_ATOL
                problem = table_mismatch(ours, path, RUN_TO_RUN_RTOL, atol)
                assert problem is None, problem
                near.append(table_difference(ours, path))
            else:
                assert ours.exists(), relative
                renderings.append(relative)
    assert compared > 50
    assert not renderings or near, f"renderings differ while every table is identical: {renderings}"
    assert not any(r.suffix == ".safetensors" for r in renderings), renderings  # quantized models: exact
    if near:
        warnings.warn("SLURM run's tables equal the local run's only within float rounding: " + " | ".join(near)
                      + f" ({float_environment_resets(tiny_run, tmp_path)})")
    proc = run_snakemake(tmp_path, "-n", *SLURM_ARGS)
    assert "Nothing to be done" in proc.stdout + proc.stderr
