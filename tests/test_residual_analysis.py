"""The residual findings computed from the stage's tables: correlations, amplification, γ ranks,
logit-lens and restore summaries, and the FP-only breakage predictor."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qbreak.io import AMPLIFICATION_SCHEMA, DIMS_SCHEMA, LENS_SCHEMA, NLL_SCHEMA, RESIDUALS_SCHEMA, RESTORE_SCHEMA
from qbreak.residual_analysis import (
    amplification_summary,
    auroc,
    cross_validated_auroc,
    gamma_outliers,
    lens_summary,
    norm_error_correlations,
    per_layer,
    predictor_table,
    restore_summary,
)
from qbreak.selection import SelectionConfig, select_examples
from tests.test_correlate import errors_table


def test_auroc() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75  # sklearn's example
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_cross_validated_logistic_regression_finds_a_signal_and_no_more() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    y = x[:, 2] - 0.5 * x[:, 4] + 0.3 * rng.standard_normal(300) > 1.0
    assert cross_validated_auroc(x, y, folds=5, seed=0) > 0.95
    noise = rng.standard_normal((300, 6))
    assert cross_validated_auroc(noise, y, folds=5, seed=0) < 0.65  # no signal found in noise
    assert cross_validated_auroc(x, y, seed=1) == pytest.approx(cross_validated_auroc(x, y, seed=1))


def _synthetic(n: int = 200, layers: int = 3) -> tuple[pa.Table, pa.Table, pa.Table, np.ndarray]:
    """Errors that grow as the last layer's FP norm shrinks (the paper's direction), and residuals."""
    rng = np.random.default_rng(1)
    norm_last = rng.uniform(10, 20, n)
    error = 3.0 - 0.1 * norm_last + 0.05 * rng.standard_normal(n)
    errors = errors_table({"a": error, "b": error + 0.1 * rng.standard_normal(n)}, {"a": ("x", 3), "b": ("y", 3)})
    rows = []
    for i in range(n):
        for layer in range(layers):
            pre = norm_last[i] if layer == layers - 1 else rng.uniform(10, 20)
            rows.append((i, layer, "pre_norm", pre))
            rows.append((i, layer, "post_norm", 40 - pre))
    residuals = pa.table(
        {
            "example_id": [r[0] for r in rows],
            "model": ["m"] * len(rows),
            "method": ["fp"] * len(rows),
            "layer": [r[1] for r in rows],
            "site": [r[2] for r in rows],
            "norm": [r[3] for r in rows],
            "kurtosis": [3.0] * len(rows),
        },
        schema=RESIDUALS_SCHEMA,
    )
    examples = pa.table({"example_id": np.arange(n, dtype=np.int32), "input_ids": [[0, i, i + 1, 7] for i in range(n)]})
    selection = select_examples(errors, examples, "m", SelectionConfig())
    return errors, residuals, selection, norm_last


def test_per_layer_matrix_and_norm_error_correlations() -> None:
    errors, residuals, _, norm_last = _synthetic()
    ids = np.arange(200)
    matrix = per_layer(residuals, "norm", ids, "pre_norm")
    assert matrix.shape == (3, 200)
    np.testing.assert_array_equal(matrix[2], norm_last)
    corr = norm_error_correlations(residuals, errors, "m", n_boot=200)
    rows = {(r["method"], r["layer"], r["site"]): r for r in corr.to_pylist()}
    assert len(rows) == 3 * 3 * 2  # methods a, b and 'mean' × layers × sites
    assert rows[("a", 2, "pre_norm")]["pearson"] < -0.9 < rows[("a", 2, "pre_norm")]["pearson_hi"] + 1
    assert rows[("a", 2, "post_norm")]["pearson"] > 0.9  # the order reverses after the norm
    assert abs(rows[("mean", 0, "pre_norm")]["pearson"]) < 0.3


def test_predictor_in_the_papers_direction() -> None:
    errors, residuals, selection, _ = _synthetic()
    table = predictor_table(residuals, errors, selection, "m", folds=5)
    rows = {(r["method"], r["predictor"]): r for r in table.to_pylist()}
    assert rows[("a", "final_layer_norm")]["n_positive"] == 20
    assert rows[("a", "final_layer_norm")]["auroc"] > 0.95  # small norm = breaks
    assert rows[("mean", "logistic_all_layers_cv")]["auroc"] > 0.9
    assert rows[("mean", "final_layer_norm")]["n_positive"] == sum(
        s in ("large", "duplicate") for s in selection.column("set").to_pylist()
    )


def test_amplification_summary_correlates_mse_with_post_norm() -> None:
    errors, residuals, _, norm_last = _synthetic()
    post = 40 - norm_last
    rows = [(i, layer, (post[i] if layer == 2 else 1.0) ** 2 * 1e-4, 2.0) for i in range(200) for layer in range(3)]
    amp = pa.table(
        {
            "example_id": [r[0] for r in rows], "model": ["m"] * 600, "method": ["a"] * 600,
            "layer": [r[1] for r in rows], "mlp_mse": [r[2] for r in rows], "mlp_power": [r[3] for r in rows],
        },
        schema=AMPLIFICATION_SCHEMA,
    )
    summary = {r["layer"]: r for r in amplification_summary({"a": amp}, residuals, errors, "m", n_boot=100).to_pylist()}
    assert summary[2]["spearman"] == pytest.approx(1.0)
    assert summary[0]["mean_mlp_mse"] == pytest.approx(1e-4)
    assert summary[0]["relative_mse"] == pytest.approx(1e-4 / 2.0)


def test_gamma_outliers_rank_the_outlier_dims() -> None:
    d = 8
    mean_abs = np.array([1.0, 1.1, 9.0, 0.9, 1.2, 5.0, 1.0, 1.05])
    gamma = np.array([1.0, 0.9, 0.01, 1.1, 1.2, -0.05, 0.8, 1.3])  # the outliers get the smallest |γ|
    dims = pa.table(
        {"model": ["m"] * d, "layer": np.zeros(d, dtype=np.int32), "dim": np.arange(d, dtype=np.int32),
         "mean_abs": mean_abs, "gamma": gamma},
        schema=DIMS_SCHEMA,
    )
    rows = gamma_outliers(dims, "m", n_outliers=2).to_pylist()
    assert [(r["dim"], r["gamma_rank"]) for r in rows] == [(2, 1.0), (5, 2.0)]
    assert rows[0]["ratio_to_median"] == pytest.approx(9.0 / np.median(mean_abs))
    assert rows[0]["gamma_percentile"] == pytest.approx(0.5 / 8 * 100)


def test_lens_and_restore_summaries() -> None:
    selection = pa.table({"example_id": [1, 2, 3, 4], "set": ["large", "large", "ctrl", "other"]})
    lens = pa.table(
        {"example_id": [1, 2, 3, 4, 1], "model": ["m"] * 5, "method": ["q"] * 5, "layer": [5, 5, 5, 5, 6],
         "nll": [2.0, 4.0, 1.0, 9.0, 3.0]},
        schema=LENS_SCHEMA,
    )
    rows = {(r["set"], r["layer"]): r for r in lens_summary({"q": lens}, selection, "m").to_pylist()}
    assert rows[("large", 5)]["mean_nll"] == 3.0 and rows[("large", 5)]["n"] == 2
    assert rows[("ctrl", 5)]["perplexity"] == pytest.approx(np.e)

    def nll_table(values: list[float]) -> pa.Table:
        return pa.table(
            {"example_id": [1, 2, 3, 4], "model": ["m"] * 4, "method": ["x"] * 4, "nll": values,
             "n_tokens": [4, 2, 4, 4], "n_scored": [3, 1, 3, 3]},
            schema=NLL_SCHEMA,
        )

    restore = pa.table(
        {"example_id": [1, 2, 3], "model": ["m"] * 3, "method": ["q"] * 3, "restored": ["2-3"] * 3,
         "first_layer": [2] * 3, "last_layer": [3] * 3, "nll": [1.5, 1.5, 1.0], "n_scored": [3, 1, 3]},
        schema=RESTORE_SCHEMA,
    )
    summary = restore_summary({"q": restore}, {"fp": nll_table([1.0, 1.0, 0.5, 0.5]), "q": nll_table([2.0, 4.0, 1.0, 1.0])},
                              selection, "m")
    ppl = {(r["set"], r["restored"]): r["perplexity"] for r in summary.to_pylist()}
    assert ppl[("large", "none (fp)")] == pytest.approx(np.e)
    assert ppl[("large", "none (quantized)")] == pytest.approx(np.exp((2.0 * 3 + 4.0 * 1) / 4))  # token-weighted
    assert ppl[("large", "2-3")] == pytest.approx(np.exp(1.5))
    assert ppl[("ctrl", "2-3")] == pytest.approx(np.e)
