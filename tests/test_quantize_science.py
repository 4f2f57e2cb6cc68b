"""Quantization on the real bundled model: identities and orderings that a correct pipeline shows.

Small sizes (32 examples of 64 tokens, 16 calibration examples) keep this to a few minutes.
The bundled model's reference weights are themselves Q4_1, so 4-bit errors are small but real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qbreak.corpus import build_examples, iter_documents
from qbreak.io import EXAMPLES_SCHEMA, write_table
from qbreak.models import load_model
from qbreak.nll import per_example_nll
from qbreak.quantize.run import quantize_model

pytestmark = pytest.mark.slow

METHODS = {
    "rtn-w8": {"kind": "rtn", "bits": 8, "group_size": 64},
    "rtn-w3": {"kind": "rtn", "bits": 3, "group_size": 64},
    "rtn-w4": {"kind": "rtn", "bits": 4, "group_size": 64},
    "nf-w3": {"kind": "nf", "bits": 3, "group_size": 64},
    "nf-w4": {"kind": "nf", "bits": 4, "group_size": 64},
    "hqq-w3": {"kind": "hqq", "bits": 3, "group_size": 64},
    "hqq-w4": {"kind": "hqq", "bits": 4, "group_size": 64},
    "gptq-w3": {"kind": "gptq", "bits": 3, "group_size": 64, "calibration_samples": 16},
    "gptq-w4": {"kind": "gptq", "bits": 4, "group_size": 64, "calibration_samples": 16},
    "awq-w3": {"kind": "awq", "bits": 3, "group_size": 64, "calibration_samples": 8, "n_grid": 5},
    "awq-w4": {"kind": "awq", "bits": 4, "group_size": 64, "calibration_samples": 8, "n_grid": 5},
}


@pytest.fixture(scope="module")
def errors(bundled_model_dir: Path, bundled_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per-example error of every method above, plus its quant.json, on 32 held-out examples."""
    work = tmp_path_factory.mktemp("quantize-science")
    evaluation, calibration = build_examples(
        iter_documents({"bundled": "wikipedia-vital"}), bundled_tokenizer, 64, 32, 16, seed=0, start_token_id=0
    )
    write_table(calibration, work / "calibration.arrow", EXAMPLES_SCHEMA)
    nll_fp = per_example_nll(load_model(bundled_model_dir), evaluation, "m", "fp").column("nll").to_numpy()
    out: dict = {"fp": nll_fp}
    for name, entry in METHODS.items():
        folder = work / name
        quantize_model(name, entry, bundled_model_dir, work / "calibration.arrow", folder)
        nll_q = per_example_nll(load_model(folder), evaluation, "m", name).column("nll").to_numpy()
        out[name] = {"error": nll_q - nll_fp, "nll": nll_q, "quant": json.loads((folder / "quant.json").read_text())}
        shutil.rmtree(folder)  # 538 MB each
    return out


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))  # every example has the same number of scored tokens


def test_rtn_8bit_is_near_lossless(errors: dict) -> None:
    assert np.abs(errors["rtn-w8"]["error"]).mean() < 0.01


@pytest.mark.parametrize("kind", ["rtn", "nf", "hqq", "gptq", "awq"])
def test_three_bits_hurt_more_than_four(errors: dict, kind: str) -> None:
    e3, e4 = errors[f"{kind}-w3"]["error"].mean(), errors[f"{kind}-w4"]["error"].mean()
    assert e3 > e4, (kind, e3, e4)
    assert e3 > 0.05  # 3-bit damage is real even against the Q4_1 reference


def test_gptq_beats_round_to_nearest_at_three_bits(errors: dict) -> None:
    assert perplexity(errors["gptq-w3"]["nll"]) < perplexity(errors["rtn-w3"]["nll"])


def test_quant_json_records_settings_calibration_and_versions(errors: dict) -> None:
    gptq = errors["gptq-w3"]["quant"]
    assert (gptq["kind"], gptq["bits"], gptq["group_size"], gptq["family"]) == ("gptq", 3, 64, "gptq")
    assert gptq["calibration"]["samples"] == 16 and len(gptq["calibration"]["sha256"]) == 64
    assert gptq["seconds"] > 0 and gptq["peak_rss_mb"] > 0 and gptq["versions"]["llmcompressor"] != "not installed"
    assert errors["rtn-w3"]["quant"]["calibration"] is None
    assert errors["awq-w3"]["quant"]["tensors_changed"] > errors["awq-w3"]["quant"]["layers_quantized"]  # norms too
