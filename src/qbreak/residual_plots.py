"""Residual-stream figures (seaborn), drawn only from the Arrow tables of the residual stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import seaborn as sns

from qbreak.plots import plt

SET_LABELS = {"large": "D_large", "ctrl": "D_ctrl"}


def residual_norms(residuals_fp: pa.Table, selection: pa.Table, model: str) -> plt.Figure:
    """FP mean residual norm per layer, D_large vs D_ctrl, before and after the RMSNorm."""
    sets = {
        i: SET_LABELS[s]
        for i, s in zip(selection.column("example_id").to_pylist(), selection.column("set").to_pylist(), strict=True)
        if s in SET_LABELS
    }
    data = residuals_fp.select(["example_id", "layer", "site", "norm"]).to_pydict()
    keep = [k for k, i in enumerate(data["example_id"]) if i in sets]
    frame = {
        "layer": [data["layer"][k] for k in keep],
        "site": [data["site"][k] for k in keep],
        "norm": [data["norm"][k] for k in keep],
        "set": [sets[data["example_id"][k]] for k in keep],
    }
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, site, title in zip(axes, ("pre_norm", "post_norm"), ("residual r(l)", "after RMSNorm (MLP input)"), strict=True):
        rows = [k for k, s in enumerate(frame["site"]) if s == site]
        sns.lineplot(
            x=[frame["layer"][k] for k in rows], y=[frame["norm"][k] for k in rows],
            hue=[frame["set"][k] for k in rows], hue_order=list(SET_LABELS.values()), errorbar=("ci", 95),
            n_boot=200, seed=0, ax=ax,
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("mean token L2 norm (FP)")
        ax.set_title(title)
    figure.suptitle(f"{model}: FP residual magnitudes of the inputs that break vs control")
    figure.tight_layout()
    return figure


def norm_error_correlation(norm_corr: pa.Table, model: str) -> plt.Figure:
    """Pearson r between the FP norm at each layer and each method's error (pre- and post-norm)."""
    data = norm_corr.to_pydict()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, site in zip(axes, ("pre_norm", "post_norm"), strict=True):
        rows = [k for k, s in enumerate(data["site"]) if s == site]
        methods = [data["method"][k] for k in rows]
        sns.lineplot(
            x=[data["layer"][k] for k in rows], y=[data["pearson"][k] for k in rows], hue=methods,
            size=[m == "mean" for m in methods], sizes={True: 2.5, False: 1.0}, legend="brief", ax=ax,
        )
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel("Pearson r (FP norm, error)")
        ax.set_title(site)
    figure.suptitle(f"{model}: do FP residual magnitudes predict the quantization error?")
    figure.tight_layout()
    return figure


def logit_lens_curves(lens: pa.Table, model: str) -> plt.Figure:
    """Logit-lens NLL per layer: FP and each quantized method on D_large and D_ctrl (4 lines a panel)."""
    data = lens.to_pydict()
    methods = [m for m in dict.fromkeys(data["method"]) if m != "fp"]
    columns = min(4, max(1, len(methods)))
    rows_n = int(np.ceil(len(methods) / columns)) if methods else 1
    figure, axes = plt.subplots(rows_n, columns, figsize=(4 * columns, 3.3 * rows_n), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        for source, style in (("fp", "--"), (method, "-")):
            for name, color in (("large", "tab:red"), ("ctrl", "tab:blue")):
                keep = [k for k in range(len(data["method"])) if data["method"][k] == source and data["set"][k] == name]
                ax.plot([data["layer"][k] for k in keep], [data["mean_nll"][k] for k in keep], style, color=color,
                        label=f"{'FP' if source == 'fp' else 'quantized'} {SET_LABELS[name]}")
        ax.set_title(method)
        ax.set_xlabel("layer")
        ax.set_ylabel("logit-lens NLL (nats)")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if methods:
        axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"{model}: where do broken inputs depart from FP?")
    figure.tight_layout()
    return figure


def amplification_curves(amplification: pa.Table, model: str) -> plt.Figure:
    """Per layer: correlation of the MLP weight-error MSE with the FP post-norm magnitude, and the relative MSE."""
    data = amplification.to_pydict()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(x=data["layer"], y=data["pearson"], hue=data["method"], ax=axes[0])
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("Pearson r (post-norm magnitude, MLP MSE)")
    sns.lineplot(x=data["layer"], y=data["relative_mse"], hue=data["method"], legend=False, ax=axes[1])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("MLP output MSE / FP MLP output power")
    for ax in axes:
        ax.set_xlabel("layer")
    figure.suptitle(f"{model}: quantized MLPs on the FP residual: does a larger input mean a larger error?")
    figure.tight_layout()
    return figure


def restore_bars(restore: pa.Table, model: str) -> plt.Figure:
    """Perplexity on D_large and D_ctrl: FP, fully quantized and with late layers restored, per method."""
    data = restore.to_pydict()
    methods = list(dict.fromkeys(data["method"]))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(methods) * 2), 4.2), squeeze=False)
    for ax, name in zip(axes[0], ("large", "ctrl"), strict=True):
        keep = [k for k in range(len(data["set"])) if data["set"][k] == name]
        sns.barplot(
            x=[data["method"][k] for k in keep], y=[data["perplexity"][k] for k in keep],
            hue=[data["restored"][k] for k in keep], order=methods, ax=ax,
        )
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(SET_LABELS[name])
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7, title="restored layers")
    figure.suptitle(f"{model}: late layers back in full precision")
    figure.tight_layout()
    return figure


def patching_bars(summary: pa.Table, model: str) -> plt.Figure:
    """Perplexity on D_large and D_ctrl with each site patched on a layer range, per method."""
    rows = [r for r in summary.to_pylist() if r["site"] in ("fp", "none") or "-" in r["layers"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(methods) * 2), 4.2), squeeze=False)
    for ax, name in zip(axes[0], ("large", "ctrl"), strict=True):
        mine = [r for r in rows if r["set"] == name]
        labels = [{"fp": "FP", "none": "quantized"}.get(r["site"], f"{r['site']} {r['layers']}") for r in mine]
        sns.barplot(x=[r["method"] for r in mine], y=[r["perplexity"] for r in mine], hue=labels, order=methods, ax=ax)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(SET_LABELS[name])
        ax.legend(fontsize=7, title="patched")
    figure.suptitle(f"{model}: FP activations patched into the quantized model")
    figure.tight_layout()
    return figure


def patching_sweep(summary: pa.Table, model: str) -> plt.Figure:
    """Share of the FP–quantized gap on D_large recovered by patching one site at one layer."""
    rows = [r for r in summary.to_pylist() if r["set"] == "large" and r["layers"].isdigit()]
    methods = list(dict.fromkeys(r["method"] for r in rows)) or ["(no sweep)"]
    figure, axes = plt.subplots(len(methods), 1, figsize=(10, 2.2 + 1.6 * len(methods)), squeeze=False)
    for ax, method in zip(axes[:, 0], methods, strict=True):
        mine = [r for r in rows if r["method"] == method]
        sites = list(dict.fromkeys(r["site"] for r in mine))
        layers = sorted({int(r["layers"]) for r in mine})
        matrix = np.full((len(sites), len(layers)), np.nan)
        for r in mine:
            if r["recovered"] is not None:
                matrix[sites.index(r["site"]), layers.index(int(r["layers"]))] = r["recovered"]
        sns.heatmap(matrix, xticklabels=layers, yticklabels=sites, cmap="viridis", ax=ax,
                    cbar_kws={"label": "gap recovered"})
        ax.set_xlabel("patched layer")
        ax.set_title(f"{method}: D_large")
    figure.suptitle(f"{model}: one site at one layer")
    figure.tight_layout()
    return figure
