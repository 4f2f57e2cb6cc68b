"""Job functions on saved model folders: the fused model pass writes what the per-stage jobs write."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from qbreak import runtime
from qbreak.errors import QbreakError
from qbreak.io import EXAMPLES_SCHEMA, read_table, write_table
from qbreak.jobs import FP_OUTPUTS, METHOD_OUTPUTS, compare_job, fp_pass_job, score_model_job
from qbreak.nll import per_example_nll
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


def test_score_model_job_in_bfloat16_on_a_cpu_agrees_with_float32(folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 on a CPU (allowed where it has AMX; any CPU computes it, slower without): the fused job
    writes every table, its NLLs and KLs stay near float32's and the noisier copy stays further."""
    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: True)
    root, examples = folders, str(folders / "examples.arrow")
    tables = {}
    for dtype in ("float32", "bfloat16"):
        out = root / f"dtype_{dtype}"
        score_model_job(
            "m", str(root / "fp"), examples, {**RUNTIME, "dtype": dtype}, topk=8,
            fp_outputs={name: str(out / f"fp_{name}.arrow") for name in FP_OUTPUTS},
            quantized={method: str(root / method) for method in ("a", "b")},
            outputs={m: {name: str(out / f"{m}_{name}.arrow") for name in METHOD_OUTPUTS} for m in ("a", "b")},
        )
        tables[dtype] = {p.name: read_table(p) for p in out.iterdir()}
    assert sorted(tables["bfloat16"]) == sorted(tables["float32"]) and len(tables["float32"]) == 3 + 2 * 4
    assert read_table(root / "dtype_bfloat16" / "fp_nll.arrow").schema.metadata[b"dtype"] == b"torch.bfloat16"
    for name in ("fp_nll.arrow", "a_nll.arrow", "b_nll.arrow"):
        half, full = (tables[d][name].column("nll").to_numpy() for d in ("bfloat16", "float32"))
        assert np.abs(half - full).max() < 0.05 and not np.array_equal(half, full), name
    kl = {d: {m: tables[d][f"{m}_kl.arrow"].column("kl_fp_q").to_numpy() for m in ("a", "b")} for d in tables}
    assert (kl["bfloat16"]["b"] > kl["bfloat16"]["a"]).all() and (kl["bfloat16"]["a"] >= 0).all()
    np.testing.assert_allclose(kl["bfloat16"]["b"], kl["float32"]["b"], rtol=0.1)


def test_runtime_dtype_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.torch_dtype("float32", "cpu") is torch.float32
    assert runtime.torch_dtype("float16", "cuda") is torch.float16
    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: True)
    assert runtime.torch_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: False)
    with pytest.raises(QbreakError, match=r"runtime.dtype: bfloat16 on cpu needs AMX bfloat16 units .* which this CPU lacks"):
        runtime.torch_dtype("bfloat16", "cpu")
    with pytest.raises(QbreakError, match=r"runtime.dtype: float16 is for GPUs"):
        runtime.torch_dtype("float16", "cpu")
    with pytest.raises(QbreakError, match=r"runtime.dtype: expected one of"):
        runtime.torch_dtype("float64", "cpu")


def test_a_float32_job_on_an_amx_cpu_points_to_bfloat16(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from qbreak.jobs import _runtime

    for amx in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda amx=amx: amx)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="qbreak.jobs"):
            assert _runtime(RUNTIME) == ("cpu", torch.float32, 3)
        assert ("runtime.dtype: bfloat16 runs the model passes about 3x faster" in caplog.text) is amx


TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Photosynthesis is the process by which green plants use sunlight to make sugar from carbon dioxide and water.",
    "The Pacific Ocean is the largest and deepest of the world's five oceanic divisions.",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period.",
]


@pytest.mark.slow
def test_bundled_model_nll_in_bfloat16_is_near_float32(
    bundled_model_dir: Path, bundled_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real model in bfloat16 (AMX speed on Intel Xeons): NLLs within a few tenths of a nat of float32."""
    from qbreak.models import load_model

    monkeypatch.setattr(runtime, "cpu_has_amx_bf16", lambda: True)
    table = examples_table([[0] + bundled_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS])
    nll = {
        name: per_example_nll(load_model(bundled_model_dir, dtype=runtime.torch_dtype(name, "cpu")), table, "m", "fp",
                              batch_size=2).column("nll").to_numpy()
        for name in ("float32", "bfloat16")
    }
    assert ((0.5 < nll["float32"]) & (nll["float32"] < 8)).all()  # a real model on plain English
    # measured on an Intel host with AMX: 0.07-0.16 nats on these ~20-token texts (bfloat16 weights and
    # activations); over 128-token examples it averages out to 0.012 (bench/dtype_speed.py)
    assert np.abs(nll["bfloat16"] - nll["float32"]).max() < 0.3
    assert 0 < np.abs(nll["bfloat16"] - nll["float32"]).mean() < 0.2
