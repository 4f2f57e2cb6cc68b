"""Residual-stream findings: FP norms vs errors, error amplification after RMSNorm, the γ of outlier
dimensions, and how well FP-only signals predict which inputs break (before quantizing anything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qbreak.correlate import bootstrap_indices, correlate, method_errors, rankdata, top_set
from qbreak.errors import QbreakError
from qbreak.io import (
    AMPLIFICATION_SUMMARY_SCHEMA,
    GAMMA_OUTLIERS_SCHEMA,
    LENS_SUMMARY_SCHEMA,
    NORM_CORR_SCHEMA,
    PREDICTOR_SCHEMA,
    RESTORE_SUMMARY_SCHEMA,
)

MEAN = "mean"  # the pseudo-method whose error is the average over methods (the D_large ranking)


def per_layer(table: pa.Table, value: str, ids: np.ndarray, site: str | None = None) -> np.ndarray:
    """[layers, examples] matrix of `value` from a long (example_id, layer[, site]) table; `ids` sorted."""
    if site is not None:
        table = table.filter(pc.equal(table["site"], site))
    layer = table.column("layer").to_numpy()
    example = table.column("example_id").to_numpy()
    values = table.column(value).to_numpy()
    layers = np.unique(layer)
    column = np.minimum(np.searchsorted(ids, example), max(len(ids) - 1, 0))
    known = ids[column] == example if len(ids) else np.zeros(len(example), dtype=bool)
    out = np.full((len(layers), len(ids)), np.nan)
    out[np.searchsorted(layers, layer[known]), column[known]] = values[known]
    if np.isnan(out).any():
        raise QbreakError(f"per-layer '{value}' table misses examples of the errors table")
    return out


def _error_columns(errors: pa.Table) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids, methods = method_errors(errors)
    columns = {m.method: m.error for m in methods}
    columns[MEAN] = np.mean([m.error for m in methods], axis=0)
    return ids, columns


def norm_error_correlations(
    residuals_fp: pa.Table, errors: pa.Table, model: str, n_boot: int = 1000, seed: int = 0,
    sites: Sequence[str] = ("pre_norm", "post_norm"),
) -> pa.Table:
    """Per method (and 'mean'), layer and site: correlation of the FP norm with the error."""
    ids, columns = _error_columns(errors)
    indices = bootstrap_indices(len(ids), n_boot, seed)
    rows = []
    for site in sites:
        norms = per_layer(residuals_fp, "norm", ids, site)
        for method, error in columns.items():
            for layer, norm in enumerate(norms):
                c = correlate(norm, error, indices)
                rows.append({"model": model, "method": method, "layer": layer, "site": site, **c.__dict__})
    return pa.Table.from_pylist(rows, schema=NORM_CORR_SCHEMA)


def amplification_summary(
    amplification: Mapping[str, pa.Table], residuals_fp: pa.Table, errors: pa.Table, model: str,
    n_boot: int = 1000, seed: int = 0,
) -> pa.Table:
    """Per method and layer: mean MLP output MSE, and its correlation with the FP post-norm magnitude."""
    ids, _ = method_errors(errors)
    indices = bootstrap_indices(len(ids), n_boot, seed)
    post = per_layer(residuals_fp, "norm", ids, "post_norm")
    rows = []
    for method, table in amplification.items():
        mse = per_layer(table, "mlp_mse", ids)
        power = per_layer(table, "mlp_power", ids)
        for layer in range(mse.shape[0]):
            c = correlate(post[layer], mse[layer], indices)
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "layer": layer,
                    "mean_mlp_mse": float(mse[layer].mean()),
                    "relative_mse": float(mse[layer].sum() / max(power[layer].sum(), 1e-30)),
                    **c.__dict__,
                }
            )
    return pa.Table.from_pylist(rows, schema=AMPLIFICATION_SUMMARY_SCHEMA)


def gamma_outliers(dims: pa.Table, model: str, n_outliers: int = 5) -> pa.Table:
    """Per layer, the residual's `n_outliers` largest-mean-|activation| dimensions and the rank of their
    RMSNorm |γ| among all dimensions (1 = the smallest γ)."""
    data = dims.to_pydict()
    rows = []
    for layer in sorted(set(data["layer"])):
        keep = [k for k in range(dims.num_rows) if data["layer"][k] == layer]
        order = np.argsort([data["dim"][k] for k in keep])
        mean_abs = np.array([data["mean_abs"][keep[k]] for k in order])
        gamma = np.abs(np.array([data["gamma"][keep[k]] for k in order]))
        gamma_rank = rankdata(gamma)
        median = float(np.median(mean_abs))
        for position, dim in enumerate(np.argsort(-mean_abs, kind="stable")[:n_outliers]):
            rows.append(
                {
                    "model": model,
                    "layer": int(layer),
                    "outlier": position + 1,
                    "dim": int(dim),
                    "mean_abs": float(mean_abs[dim]),
                    "ratio_to_median": float(mean_abs[dim] / median) if median > 0 else float("inf"),
                    "gamma": float(gamma[dim]),
                    "gamma_rank": float(gamma_rank[dim]),
                    "gamma_percentile": float((gamma_rank[dim] - 0.5) / len(gamma) * 100),
                    "n_dims": len(gamma),
                }
            )
    return pa.Table.from_pylist(rows, schema=GAMMA_OUTLIERS_SCHEMA)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """L2-regularized logistic regression by Newton's method; weights [features + 1] (last = bias)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        gradient = design.T @ (p - y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def cross_validated_auroc(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold AUROC of a logistic regression on standardized features (stratified, seeded folds)."""
    y = np.asarray(y, dtype=bool)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for label in (True, False):
        members = rng.permutation(np.flatnonzero(y == label))
        fold[members] = np.arange(len(members)) % folds
    scores = np.empty(len(y))
    for k in range(folds):
        train, test = fold != k, fold == k
        if not test.any() or y[train].all() or not y[train].any():
            return float("nan")
        mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-12
        w = fit_logistic((x[train] - mean) / std, y[train].astype(np.float64))
        scores[test] = np.hstack([(x[test] - mean) / std, np.ones((test.sum(), 1))]) @ w
    return auroc(scores, y)


def predictor_table(
    residuals_fp: pa.Table, errors: pa.Table, selection: pa.Table, model: str, top_fraction: float = 0.1,
    folds: int = 5, seed: int = 0,
) -> pa.Table:
    """How well FP-only residual norms flag the inputs that break, per method and for D_large.

    Label: the method's top-`top_fraction` errors (for 'mean': D_large of the selection, duplicates
    counted as broken). Predictors: the negated final-layer pre-norm magnitude (the paper finds
    broken inputs have *smaller* norms, so AUROC > 0.5 means the paper's direction), and a
    cross-validated logistic regression over every layer's pre- and post-norm magnitude.
    """
    ids, columns = _error_columns(errors)
    pre = per_layer(residuals_fp, "norm", ids, "pre_norm")
    post = per_layer(residuals_fp, "norm", ids, "post_norm")
    features = np.vstack([pre, post]).T  # [examples, 2 · layers]
    chosen = {
        int(i): s in ("large", "duplicate")
        for i, s in zip(selection.column("example_id").to_pylist(), selection.column("set").to_pylist(), strict=True)
    }
    rows = []
    for method, error in columns.items():
        if method == MEAN:
            labels = np.array([chosen.get(int(i), False) for i in ids.tolist()])
        else:
            top = top_set(error, ids, top_fraction)
            labels = np.array([int(i) in top for i in ids.tolist()])
        for predictor, value in (
            ("final_layer_norm", auroc(-pre[-1], labels)),
            ("logistic_all_layers_cv", cross_validated_auroc(features, labels, folds, seed)),
        ):
            rows.append(
                {"model": model, "method": method, "predictor": predictor, "n": len(ids),
                 "n_positive": int(labels.sum()), "auroc": value}
            )
    return pa.Table.from_pylist(rows, schema=PREDICTOR_SCHEMA)


def _set_of(selection: pa.Table) -> dict[int, str]:
    return {
        int(i): s
        for i, s in zip(selection.column("example_id").to_pylist(), selection.column("set").to_pylist(), strict=True)
        if s in ("large", "ctrl")
    }


def lens_summary(lens: Mapping[str, pa.Table], selection: pa.Table, model: str) -> pa.Table:
    """Per method, set (D_large / D_ctrl) and layer: mean logit-lens NLL and its perplexity."""
    sets = _set_of(selection)
    rows = []
    for method, table in lens.items():
        data = table.to_pydict()
        groups: dict[tuple[str, int], list[float]] = {}
        for example_id, layer, nll in zip(data["example_id"], data["layer"], data["nll"], strict=True):
            if example_id in sets:
                groups.setdefault((sets[example_id], layer), []).append(nll)
        for (name, layer), values in sorted(groups.items()):
            mean = float(np.mean(values))
            rows.append({"model": model, "method": method, "set": name, "layer": layer, "n": len(values),
                         "mean_nll": mean, "perplexity": float(np.exp(mean))})
    return pa.Table.from_pylist(rows, schema=LENS_SUMMARY_SCHEMA)


def _perplexity(nll: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    mean = float((nll * weights).sum() / max(weights.sum(), 1))
    return mean, float(np.exp(mean))


def restore_summary(
    restore: Mapping[str, pa.Table], nll: Mapping[str, pa.Table], selection: pa.Table, model: str
) -> pa.Table:
    """Perplexity on D_large and D_ctrl: FP, fully quantized, and each restored range, per method."""
    sets = _set_of(selection)
    rows = []

    def add(method: str, restored: str, table: pa.Table, first: int | None, last: int | None) -> None:
        data = table.to_pydict()
        for name in ("large", "ctrl"):
            keep = [k for k, i in enumerate(data["example_id"]) if sets.get(i) == name]
            if not keep:
                continue
            values = np.array([data["nll"][k] for k in keep])
            weights = np.array([data["n_scored"][k] for k in keep], dtype=np.float64)
            mean, ppl = _perplexity(values, weights)
            rows.append({"model": model, "method": method, "set": name, "restored": restored,
                         "first_layer": first, "last_layer": last, "n": len(keep), "mean_nll": mean,
                         "perplexity": ppl})

    for method, table in restore.items():
        add(method, "none (fp)", nll["fp"], None, None)
        add(method, "none (quantized)", nll[method], None, None)
        data = table.to_pydict()
        for label in dict.fromkeys(data["restored"]):
            part = table.filter(pc.equal(table["restored"], label))
            add(method, label, part, part.column("first_layer")[0].as_py(), part.column("last_layer")[0].as_py())
    return pa.Table.from_pylist(rows, schema=RESTORE_SUMMARY_SCHEMA)
