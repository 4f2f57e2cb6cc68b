"""The patching results read back: Table-4 perplexities per set, site and layer set (no torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from qbreak.io import PATCH_SUMMARY_SCHEMA


def patching_summary(patching: Mapping[str, pa.Table], nll_fp: pa.Table, selection: pa.Table, model: str) -> pa.Table:
    """Perplexity on D_large and D_ctrl per method, site and layer set, next to FP (io.PATCH_SUMMARY_SCHEMA).

    `recovered` = (ppl_quantized − ppl_patched) / (ppl_quantized − ppl_fp): 1 when a patch gives back
    FP's perplexity, 0 when it does nothing.
    """
    sets = {
        int(i): s
        for i, s in zip(selection.column("example_id").to_pylist(), selection.column("set").to_pylist(), strict=True)
        if s in ("large", "ctrl")
    }
    fp = dict(zip(nll_fp.column("example_id").to_pylist(), zip(nll_fp.column("nll").to_pylist(),
                                                              nll_fp.column("n_scored").to_pylist(), strict=True),
                  strict=True))
    rows = []
    for method, table in patching.items():
        data = table.to_pydict()
        groups: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
        for k, example_id in enumerate(data["example_id"]):
            if example_id in sets:
                key = (sets[example_id], data["site"][k], data["layers"][k])
                groups.setdefault(key, []).append((data["nll"][k], data["n_scored"][k]))
        for name in ("large", "ctrl"):
            members = [i for i, s in sets.items() if s == name]
            if not members or (name, "none", "none") not in groups:
                continue
            ppl_fp = _ppl([fp[i] for i in members])
            ppl_q = _ppl(groups[(name, "none", "none")])
            rows.append(_summary_row(model, method, name, "fp", "none", ppl_fp, ppl_fp, ppl_q, len(members)))
            for (set_name, site, label), values in sorted(groups.items()):
                if set_name == name:
                    rows.append(_summary_row(model, method, name, site, label, _ppl(values), ppl_fp, ppl_q, len(values)))
    return pa.Table.from_pylist(rows, schema=PATCH_SUMMARY_SCHEMA)


def _ppl(values: Sequence[tuple[float, int]]) -> float:
    nll = np.array([v[0] for v in values])
    weights = np.array([v[1] for v in values], dtype=np.float64)
    return float(np.exp((nll * weights).sum() / max(weights.sum(), 1.0)))


def _summary_row(
    model: str, method: str, name: str, site: str, label: str, ppl: float, ppl_fp: float, ppl_q: float, n: int
) -> dict[str, Any]:
    gap = ppl_q - ppl_fp
    return {
        "model": model, "method": method, "set": name, "site": site, "layers": label, "n": n,
        "perplexity": ppl, "recovered": (ppl_q - ppl) / gap if gap != 0 else None,
    }


def patching_markdown(summary: pa.Table, model: str, note: str | None = None) -> str:
    """The paper's Table-4 layout: FP, quantized and every patched site on the upper half, per set."""
    rows = summary.to_pylist()
    lines = [f"# FP → quantized activation patching: {model}", ""]
    if note:
        lines += [f"*{note}*", ""]
    lines += [
        "Perplexity with the quantized model's activation at a site replaced by the FP model's in the listed",
        "layers (`*_weights`: those weights put back in FP instead). recovered = share of the FP–quantized",
        "perplexity gap closed.",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += ["", f"## {method}", "", "| site | layers | D_large | recovered | D_ctrl | recovered |", "|---|---|---:|---:|---:|---:|"]
        # layer ranges only ("first-last"); the single-layer sweep is in the figure and the table
        mine = [r for r in rows if r["method"] == method and (r["site"] in ("fp", "none") or "-" in r["layers"])]
        keys = list(dict.fromkeys((r["site"], r["layers"]) for r in mine))
        for site, label in keys:
            cells = []
            for name in ("large", "ctrl"):
                match = [r for r in mine if (r["site"], r["layers"], r["set"]) == (site, label, name)]
                if match:
                    rec = match[0]["recovered"]
                    cells += [f"{match[0]['perplexity']:.2f}", "–" if rec is None else f"{rec:.2f}"]
                else:
                    cells += ["–", "–"]
            title = {"fp": "FP", "none": "quantized"}.get(site, site)
            lines.append(f"| {title} | {label if site not in ('fp', 'none') else '–'} | " + " | ".join(cells) + " |")
    if any(r["site"] == "up" for r in rows):
        lines += ["", UP_SITE_NOTE]
    return "\n".join(lines) + "\n"


# Measured by bench/up_patch_probe.py (README, Activation patching): the `up` row is an effect of the
# intervention, not where the error sits.
UP_SITE_NOTE = (
    "`up` puts FP's up_proj output next to the quantized model's own act(gate). That alone breaks even "
    "the FP model whose residual was perturbed at the first patched layer, while freezing act(gate) "
    "helps (bench/up_patch_probe.py; README, Activation patching): read a bad `up` row as an effect of "
    "the intervention, not as evidence that up_proj carries the error."
)
