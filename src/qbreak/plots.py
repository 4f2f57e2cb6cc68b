"""Figures (seaborn), drawn only from the Arrow tables the pipeline writes; saved as PNG and SVG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import seaborn as sns  # noqa: E402

from qbreak.correlate import method_errors  # noqa: E402
from qbreak.io import atomic_path  # noqa: E402


def save_figure(figure: plt.Figure, png: str | Path, svg: str | Path) -> None:
    """Write `figure` to both paths (each atomically) and close it."""
    for path, fmt in ((png, "png"), (svg, "svg")):
        # A fixed SVG hash salt and no dates: the same tables give byte-identical files.
        with atomic_path(path) as tmp, plt.rc_context({"svg.hashsalt": "qbreak"}):
            figure.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=_metadata(fmt))
    plt.close(figure)


def _metadata(fmt: str) -> dict[str, str | None]:
    return {"Date": None} if fmt == "svg" else {"Software": "qbreak"}


def _ordered_methods(errors: pa.Table) -> list[str]:
    _, methods = method_errors(errors)
    return [m.method for m in sorted(methods, key=lambda m: (m.family, m.bits, m.method))]


def correlation_heatmap(correlations: pa.Table, errors: pa.Table, model: str) -> plt.Figure:
    """Annotated Pearson r of per-example errors for every pair of methods."""
    order = _ordered_methods(errors)
    index = {m: i for i, m in enumerate(order)}
    matrix = np.eye(len(order))
    for r in correlations.to_pylist():
        if r["measure"] == "error":
            i, j = index[r["method_a"]], index[r["method_b"]]
            matrix[i, j] = matrix[j, i] = r["pearson"]
    size = 1.0 + 0.75 * len(order)
    figure, ax = plt.subplots(figsize=(size + 1.5, size))
    sns.heatmap(
        matrix, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="RdBu_r", square=True,
        xticklabels=order, yticklabels=order, cbar_kws={"label": "Pearson r of e(x)"}, ax=ax,
    )
    ax.set_title(f"{model}: do methods break the same inputs?")
    ax.tick_params(axis="x", rotation=45)
    return figure


def error_scatter(correlations: pa.Table, errors: pa.Table, model: str) -> plt.Figure:
    """Per-example errors of the most and the least correlated cross-family pair (any pair if none)."""
    pairs = [r for r in correlations.to_pylist() if r["measure"] == "error"]
    cross = [r for r in pairs if not r["same_family"]] or pairs
    ids, methods = method_errors(errors)
    by_name = {m.method: m.error for m in methods}
    chosen = [max(cross, key=lambda r: r["pearson"]), min(cross, key=lambda r: r["pearson"])] if cross else []
    figure, axes = plt.subplots(1, max(1, len(chosen)), figsize=(5 * max(1, len(chosen)), 4.5), squeeze=False)
    for ax, r, label in zip(axes[0], chosen, ("most correlated", "least correlated"), strict=False):
        x, y = by_name[r["method_a"]], by_name[r["method_b"]]
        sns.scatterplot(x=x, y=y, s=14, alpha=0.6, edgecolor=None, ax=ax)
        ax.set_xlabel(f"error {r['method_a']} (nats/token)")
        ax.set_ylabel(f"error {r['method_b']} (nats/token)")
        ax.set_title(f"{label}: r = {r['pearson']:.2f} [{r['pearson_lo']:.2f}, {r['pearson_hi']:.2f}]")
    figure.suptitle(f"{model}: per-example errors, {len(ids)} examples")
    figure.tight_layout()
    return figure


def error_distributions(errors: pa.Table, model: str) -> plt.Figure:
    """Distribution of the per-example error of each method."""
    order = _ordered_methods(errors)
    data = errors.select(["method", "error"]).to_pydict()
    figure, ax = plt.subplots(figsize=(1.2 + 0.9 * len(order), 4.5))
    sns.boxplot(x=data["method"], y=data["error"], order=order, color="lightsteelblue", fliersize=0, orient="x", ax=ax)
    # Seeded jitter (seaborn's stripplot draws from the global RNG): reruns give identical figures.
    rng = np.random.default_rng(0)
    methods = np.array(data["method"])
    for position, method in enumerate(order):
        values = np.array(data["error"])[methods == method]
        ax.scatter(position + rng.uniform(-0.2, 0.2, len(values)), values, s=3, alpha=0.4, color="black")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("")
    ax.set_ylabel("e(x) = NLL_q − NLL_fp (nats/token)")
    ax.set_title(f"{model}: per-example quantization error")
    ax.tick_params(axis="x", rotation=45)
    return figure
