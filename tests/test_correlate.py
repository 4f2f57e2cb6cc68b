"""Error correlations, bootstrap intervals, top-set overlap and the summary of pairs."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from qbreak.correlate import (
    bootstrap_indices,
    correlate,
    correlation_table,
    jaccard,
    overlap_table,
    rankdata,
    spearman,
    summary_table,
    top_set,
)
from qbreak.errors import QbreakError
from qbreak.io import CORRELATION_SUMMARY_SCHEMA, CORRELATIONS_SCHEMA, ERRORS_SCHEMA, KL_SCHEMA, OVERLAP_SCHEMA


def errors_table(errors: dict[str, np.ndarray], families: dict[str, tuple[str, int]], ids: np.ndarray | None = None) -> pa.Table:
    """An errors table (io.ERRORS_SCHEMA) from per-method error arrays."""
    parts = []
    for method, values in errors.items():
        n = len(values)
        example_ids = np.arange(n) if ids is None else ids
        family, bits = families[method]
        parts.append(
            pa.table(
                {
                    "example_id": example_ids.astype(np.int32),
                    "model": ["m"] * n,
                    "method": [method] * n,
                    "kind": [family] * n,
                    "family": [family] * n,
                    "bits": np.full(n, bits, dtype=np.int32),
                    "group_size": np.full(n, 64, dtype=np.int32),
                    "nll_fp": np.full(n, 2.0),
                    "nll_q": 2.0 + values,
                    "error": values,
                },
                schema=ERRORS_SCHEMA,
            )
        )
    return pa.concat_tables(parts)


def test_rankdata_averages_ties() -> None:
    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    np.testing.assert_array_equal(rankdata(np.array([[2.0, 1.0], [1.0, 1.0]])), [[2.0, 1.0], [1.5, 1.5]])
    assert spearman(np.arange(10.0), np.exp(np.arange(10.0))) == pytest.approx(1.0)


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_bootstrap_interval_recovers_a_known_correlation(rho: float) -> None:
    rng = np.random.default_rng(5)
    x, noise = rng.standard_normal((2, 3000))
    y = rho * x + math.sqrt(1 - rho**2) * noise
    c = correlate(x, y, bootstrap_indices(len(x), 1000, seed=0))
    assert c.pearson_lo < rho < c.pearson_hi
    assert c.pearson_hi - c.pearson_lo < 0.1  # informative, not everything-goes
    rho_s = 6 / math.pi * math.asin(rho / 2)  # Spearman ρ of a bivariate normal
    assert c.spearman_lo < rho_s < c.spearman_hi
    assert c.n == 3000


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 200))
    a = correlate(x, y, bootstrap_indices(200, 300, seed=7))
    b = correlate(x, y, bootstrap_indices(200, 300, seed=7))
    c = correlate(x, y, bootstrap_indices(200, 300, seed=8))
    assert a == b and a.pearson_lo != c.pearson_lo


def _three_methods(n: int = 400) -> tuple[pa.Table, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.1, n)
    errors = {
        "gptq-w3": base + 0.02 * rng.standard_normal(n),
        "rtn-w3": base + 0.05 * rng.standard_normal(n),
        "rtn-w4": 0.2 * base + 0.05 * rng.standard_normal(n),
    }
    families = {"gptq-w3": ("gptq", 3), "rtn-w3": ("rtn", 3), "rtn-w4": ("rtn", 4)}
    return errors_table(errors, families, ids=np.arange(1000, 1000 + n)[::-1].copy()), errors


def test_correlation_table_pairs_and_kl_agreement() -> None:
    table, errors = _three_methods()
    ids = np.arange(1000, 1400)
    kl = {
        "rtn-w3": pa.table(
            {
                "example_id": ids.astype(np.int32),
                "model": ["m"] * 400,
                "method": ["rtn-w3"] * 400,
                "kl_fp_q": errors["rtn-w3"][::-1] * 1.1 + 0.3,  # errors were stored in reverse id order
                "kl_q_fp": errors["rtn-w3"][::-1],
                "kl_fp_q_topk": errors["rtn-w3"][::-1],
                "topk": np.full(400, 32, dtype=np.int32),
                "n_tokens": np.full(400, 8, dtype=np.int32),
                "n_scored": np.full(400, 7, dtype=np.int32),
            },
            schema=KL_SCHEMA,
        )
    }
    corr = correlation_table(table, kl, "m", n_boot=200, seed=0)
    assert corr.schema.equals(CORRELATIONS_SCHEMA)
    rows = {(r["measure"], r["method_a"], r["method_b"]): r for r in corr.to_pylist()}
    assert set(rows) == {
        ("error", "gptq-w3", "rtn-w3"),
        ("error", "gptq-w3", "rtn-w4"),
        ("error", "rtn-w3", "rtn-w4"),
        ("kl_vs_error", "rtn-w3", "rtn-w3"),
        ("kl_topk_vs_kl", "rtn-w3", "rtn-w3"),
    }
    pair = rows[("error", "gptq-w3", "rtn-w3")]
    assert pair["pearson"] == pytest.approx(np.corrcoef(errors["gptq-w3"], errors["rtn-w3"])[0, 1])
    assert not pair["same_family"] and rows[("error", "rtn-w3", "rtn-w4")]["same_family"]
    assert rows[("kl_vs_error", "rtn-w3", "rtn-w3")]["pearson"] == pytest.approx(1.0)  # aligned by example id


def test_missing_kl_rows_are_named() -> None:
    table, _ = _three_methods(20)
    kl = {"rtn-w3": KL_SCHEMA.empty_table()}
    with pytest.raises(QbreakError, match="KL table of method 'rtn-w3' has no row for example"):
        correlation_table(table, kl, "m", n_boot=100)


def test_top_sets_and_overlap() -> None:
    ids = np.arange(10)
    assert top_set(np.arange(10.0), ids, 0.2) == {8, 9}
    assert top_set(np.ones(10), ids, 0.25) == {0, 1, 2}  # ⌈2.5⌉ = 3, ties by smaller id
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    table, _ = _three_methods()
    overlap = overlap_table(table, "m", fraction=0.1)
    assert overlap.schema.equals(OVERLAP_SCHEMA)
    rows = {(r["method_a"], r["method_b"]): r for r in overlap.to_pylist()}
    assert all(r["k"] == 40 and r["n"] == 400 for r in rows.values())
    assert rows[("gptq-w3", "rtn-w3")]["jaccard"] > 0.5 > rows[("gptq-w3", "rtn-w3")]["jaccard_random"]
    assert rows[("gptq-w3", "rtn-w3")]["jaccard_random"] == pytest.approx(4 / 76)  # k²/n = 4 shared of 76
    same = overlap_table(errors_table({"a": np.arange(50.0), "b": np.arange(50.0)}, {"a": ("x", 3), "b": ("y", 3)}), "m")
    assert same.column("jaccard").to_pylist() == [1.0]


def test_summary_groups_cross_family_pairs() -> None:
    table, _ = _three_methods()
    corr = correlation_table(table, {}, "m", n_boot=100)
    summary = summary_table(corr, overlap_table(table, "m"), "m")
    assert summary.schema.equals(CORRELATION_SUMMARY_SCHEMA)
    groups = {r["group"]: r for r in summary.to_pylist()}
    pearson = {(r["method_a"], r["method_b"]): r["pearson"] for r in corr.to_pylist()}
    cross = [pearson[("gptq-w3", "rtn-w3")], pearson[("gptq-w3", "rtn-w4")]]
    assert groups["cross_family"]["n_pairs"] == 2
    assert groups["cross_family"]["mean_pearson"] == pytest.approx(np.mean(cross))
    assert groups["cross_family_3bit"]["n_pairs"] == 1 and groups["cross_family_4bit"]["n_pairs"] == 0
    assert groups["same_family"]["mean_pearson"] == pytest.approx(pearson[("rtn-w3", "rtn-w4")])
    assert groups["kl_vs_error"]["n_pairs"] == 0 and groups["kl_vs_error"]["mean_pearson"] is None
