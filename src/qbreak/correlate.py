"""Do different methods break the same inputs? Error correlations, top-set overlap, KL agreement.

All functions take the tidy tables the pipeline writes (errors, KL) and return tidy tables; the
bootstrap is seeded, and every pair of methods is resampled with the same example indices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qbreak.errors import QbreakError
from qbreak.io import CORRELATION_SUMMARY_SCHEMA, CORRELATIONS_SCHEMA, OVERLAP_SCHEMA

CONFIDENCE = 0.95


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties get their average rank (as scipy.stats.rankdata).

    Vectorized over the leading axes (a bootstrap ranks 1000 resamples at once): sort each row,
    find each tie group's first and last sorted position, and scatter their mean back.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] == 0:
        return values.copy()
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    positions = np.broadcast_to(np.arange(n), values.shape)
    starts = np.ones(values.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(values.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, positions, n - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (NaN where either side is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (xc * yc).sum(axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ (Pearson of average ranks) along the last axis."""
    return pearson(rankdata(x), rankdata(y))


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman of two paired samples with percentile bootstrap intervals."""

    n: int
    pearson: float
    pearson_lo: float
    pearson_hi: float
    spearman: float
    spearman_lo: float
    spearman_hi: float


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampling indices (with replacement), seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def correlate(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> Correlation:
    """Correlations of x and y with 95% percentile intervals over the resamples `indices` [n_boot, n]."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired 1-d samples expected, got shapes {x.shape} and {y.shape}")
    tail = (1 - CONFIDENCE) / 2 * 100
    boot_p = pearson(x[indices], y[indices])
    boot_s = spearman(x[indices], y[indices])
    p_lo, p_hi = np.nanpercentile(boot_p, [tail, 100 - tail]) if np.isfinite(boot_p).any() else (np.nan, np.nan)
    s_lo, s_hi = np.nanpercentile(boot_s, [tail, 100 - tail]) if np.isfinite(boot_s).any() else (np.nan, np.nan)
    return Correlation(
        n=len(x),
        pearson=float(pearson(x, y)),
        pearson_lo=float(p_lo),
        pearson_hi=float(p_hi),
        spearman=float(spearman(x, y)),
        spearman_lo=float(s_lo),
        spearman_hi=float(s_hi),
    )


@dataclass(frozen=True)
class MethodErrors:
    """One method's per-example errors, aligned on sorted example ids."""

    method: str
    family: str
    bits: int
    error: np.ndarray  # [n] nats


def method_errors(errors: pa.Table) -> tuple[np.ndarray, list[MethodErrors]]:
    """(sorted example ids, each method's errors in that order) from an errors table (io.ERRORS_SCHEMA)."""
    data = errors.select(["example_id", "method", "family", "bits", "error"]).to_pydict()
    methods: dict[str, dict[int, float]] = {}
    described: dict[str, tuple[str, int]] = {}
    for example_id, method, family, bits, error in zip(*data.values(), strict=True):
        methods.setdefault(method, {})[example_id] = error
        described[method] = (family, bits)
    if not methods:
        raise QbreakError("the errors table is empty: configure at least one method")
    ids = np.array(sorted(next(iter(methods.values()))), dtype=np.int64)
    out = []
    for method, values in methods.items():
        if sorted(values) != ids.tolist():
            raise QbreakError(f"errors table: method '{method}' covers other examples than the others")
        family, bits = described[method]
        out.append(MethodErrors(method, family, bits, np.array([values[i] for i in ids.tolist()])))
    return ids, out


def _aligned(table: pa.Table, value: str, ids: np.ndarray, what: str) -> np.ndarray:
    values = dict(zip(table.column("example_id").to_pylist(), table.column(value).to_pylist(), strict=True))
    missing = [i for i in ids.tolist() if i not in values]
    if missing:
        raise QbreakError(f"{what} has no row for example {missing[0]}")
    return np.array([values[i] for i in ids.tolist()], dtype=np.float64)


def correlation_table(
    errors: pa.Table, kl: Mapping[str, pa.Table], model: str, n_boot: int = 1000, seed: int = 0
) -> pa.Table:
    """Every pair of methods (measure 'error') and, per method, KL vs error ('kl_vs_error') and top-k KL vs
    exact KL ('kl_topk_vs_kl'); io.CORRELATIONS_SCHEMA."""
    ids, methods = method_errors(errors)
    indices = bootstrap_indices(len(ids), n_boot, seed)
    rows: list[dict[str, object]] = []

    def add(measure: str, a: MethodErrors, b: MethodErrors, x: np.ndarray, y: np.ndarray) -> None:
        c = correlate(x, y, indices)
        rows.append(
            {
                "model": model,
                "measure": measure,
                "method_a": a.method,
                "method_b": b.method,
                "family_a": a.family,
                "family_b": b.family,
                "bits_a": a.bits,
                "bits_b": b.bits,
                "same_family": a.family == b.family,
                **c.__dict__,
            }
        )

    for a, b in itertools.combinations(methods, 2):
        add("error", a, b, a.error, b.error)
    for m in methods:
        if m.method in kl:
            exact = _aligned(kl[m.method], "kl_fp_q", ids, f"KL table of method '{m.method}'")
            add("kl_vs_error", m, m, exact, m.error)
            add("kl_topk_vs_kl", m, m, _aligned(kl[m.method], "kl_fp_q_topk", ids, "KL table"), exact)
    return pa.Table.from_pylist(rows, schema=CORRELATIONS_SCHEMA)


def top_set(values: np.ndarray, ids: np.ndarray, fraction: float) -> set[int]:
    """The ids of the ⌈fraction·n⌉ largest values (ties broken by the smaller id)."""
    k = max(1, math.ceil(fraction * len(values)))
    order = np.lexsort((ids, -np.asarray(values)))
    return set(ids[order[:k]].tolist())


def jaccard(a: set[int] | set[tuple[int, ...]], b: set[int] | set[tuple[int, ...]]) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def overlap_table(errors: pa.Table, model: str, fraction: float = 0.1) -> pa.Table:
    """Jaccard of the top-`fraction` error sets of every pair of methods (io.OVERLAP_SCHEMA).

    jaccard_random is the expectation for two independent random sets of the same size,
    (k²/n) / (2k − k²/n), the floor a real overlap should be read against.
    """
    ids, methods = method_errors(errors)
    n = len(ids)
    rows = []
    for a, b in itertools.combinations(methods, 2):
        top_a, top_b = top_set(a.error, ids, fraction), top_set(b.error, ids, fraction)
        k = len(top_a)
        shared = k * k / n
        rows.append(
            {
                "model": model,
                "method_a": a.method,
                "method_b": b.method,
                "same_family": a.family == b.family,
                "n": n,
                "k": k,
                "shared": len(top_a & top_b),
                "jaccard": jaccard(top_a, top_b),
                "jaccard_random": shared / (2 * k - shared),
            }
        )
    return pa.Table.from_pylist(rows, schema=OVERLAP_SCHEMA)


def summary_table(correlations: pa.Table, overlap: pa.Table, model: str) -> pa.Table:
    """Averages over groups of pairs: the paper's headline is the cross-family mean Pearson r."""
    pairs = [r for r in correlations.to_pylist() if r["measure"] == "error"]
    jaccards = {(r["method_a"], r["method_b"]): r["jaccard"] for r in overlap.to_pylist()}
    groups: dict[str, list[dict[str, object]]] = {
        "all_pairs": pairs,
        "cross_family": [r for r in pairs if not r["same_family"]],
        "cross_family_same_bits": [r for r in pairs if not r["same_family"] and r["bits_a"] == r["bits_b"]],
        "same_family": [r for r in pairs if r["same_family"]],
    }
    for bits in sorted({r["bits_a"] for r in pairs} | {r["bits_b"] for r in pairs}):
        groups[f"cross_family_{bits}bit"] = [
            r for r in pairs if not r["same_family"] and r["bits_a"] == r["bits_b"] == bits
        ]
    for measure in ("kl_vs_error", "kl_topk_vs_kl"):
        groups[measure] = [r for r in correlations.to_pylist() if r["measure"] == measure]
    rows = []
    for group, members in groups.items():
        pearsons = np.array([r["pearson"] for r in members], dtype=np.float64)
        spearmans = np.array([r["spearman"] for r in members], dtype=np.float64)
        overlaps = [jaccards[(r["method_a"], r["method_b"])] for r in members if (r["method_a"], r["method_b"]) in jaccards]
        rows.append(
            {
                "model": model,
                "group": group,
                "n_pairs": len(members),
                "mean_pearson": _mean(pearsons),
                "min_pearson": float(np.nanmin(pearsons)) if len(members) else None,
                "max_pearson": float(np.nanmax(pearsons)) if len(members) else None,
                "mean_spearman": _mean(spearmans),
                "mean_jaccard": _mean(np.array(overlaps)) if overlaps else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=CORRELATION_SUMMARY_SCHEMA)


def _mean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if len(values) and np.isfinite(values).any() else None
