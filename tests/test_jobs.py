"""Job functions on saved model folders: the fused model pass writes what the per-stage jobs write."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbreak.io import EXAMPLES_SCHEMA, read_table, write_table
from qbreak.jobs import FP_OUTPUTS, METHOD_OUTPUTS, compare_job, fp_pass_job, score_model_job
from tests.conftest import make_tiny_llama, perturbed_copy
from tests.test_nll import examples_table, random_rows

RUNTIME = {"device": "cpu", "dtype": "float32", "batch_size": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FP model, two noisy copies ("methods") and ragged examples, saved as the workflow would."""
    root = tmp_path_factory.mktemp("jobs")
    fp = make_tiny_llama(seed=3)
    fp.save_pretrained(root / "fp")
    perturbed_copy(fp, scale=0.1, seed=4).save_pretrained(root / "a")
    perturbed_copy(fp, scale=0.3, seed=5).save_pretrained(root / "b")
    examples = examples_table(random_rows(8, 512, [5, 18, 11, 14], seed=0))  # ragged: padding
    write_table(examples, root / "examples.arrow", EXAMPLES_SCHEMA)
    return root


def test_score_model_job_writes_what_the_separate_jobs_write(folders: Path) -> None:
    root, examples = folders, str(folders / "examples.arrow")
    separate, fused = root / "separate", root / "fused"
    fp_files = {name: str(separate / f"fp_{name}.arrow") for name in FP_OUTPUTS}
    fp_pass_job("m", str(root / "fp"), examples, fp_files["nll"], fp_files["residuals"], fp_files["dims"], RUNTIME)
    for method in ("a", "b"):
        files = [str(separate / f"{method}_{name}.arrow") for name in METHOD_OUTPUTS]
        compare_job("m", method, str(root / "fp"), str(root / method), examples, *files, RUNTIME, topk=8)

    score_model_job(
        "m", str(root / "fp"), examples, RUNTIME, topk=8,
        fp_outputs={name: str(fused / f"fp_{name}.arrow") for name in FP_OUTPUTS},
        quantized={method: str(root / method) for method in ("a", "b")},
        outputs={method: {name: str(fused / f"{method}_{name}.arrow") for name in METHOD_OUTPUTS} for method in ("a", "b")},
    )
    names = sorted(p.name for p in separate.iterdir())
    assert names == sorted(p.name for p in fused.iterdir()) and len(names) == 3 + 2 * 4
    for name in names:
        assert read_table(fused / name).equals(read_table(separate / name)), name
    assert read_table(fused / "a_nll.arrow").column("method").to_pylist() == ["a"] * 8
    kl_a, kl_b = (read_table(fused / f"{m}_kl.arrow").column("kl_fp_q").to_numpy() for m in ("a", "b"))
    assert (kl_b > kl_a).all()  # the noisier copy is further from FP


def test_score_model_job_refuses_mismatched_outputs(folders: Path) -> None:
    with pytest.raises(ValueError, match="do not match the quantized models"):
        score_model_job("m", str(folders / "fp"), str(folders / "examples.arrow"), RUNTIME,
                        quantized={"a": str(folders / "a")}, outputs={})
    with pytest.raises(ValueError, match="output keys"):
        score_model_job("m", str(folders / "fp"), str(folders / "examples.arrow"), RUNTIME, fp_outputs={"nll": "x"})
