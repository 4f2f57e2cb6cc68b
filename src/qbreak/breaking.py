"""breaking_examples.md: the inputs quantization breaks most, as readable text next to a control set."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from qbreak.correlate import method_errors


def _truncate(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def _quote(text: str) -> str:
    # Escape what markdown would read as markup at the start of a quoted line.
    return "> " + text.replace("\\", "\\\\").replace("<", "&lt;").replace("|", "\\|")


def breaking_examples_markdown(
    selection: pa.Table,
    errors: pa.Table,
    examples: pa.Table,
    model: str,
    n_show: int = 10,
    show_chars: int = 600,
    note: str | None = None,
) -> str:
    """Markdown with a per-method summary, then the top `n_show` of D_large and `n_show` of D_ctrl."""
    ids, methods = method_errors(errors)
    position = {int(i): k for k, i in enumerate(ids.tolist())}
    nll_fp = dict(zip(errors.column("example_id").to_pylist(), errors.column("nll_fp").to_pylist(), strict=False))
    text = dict(zip(examples.column("example_id").to_pylist(), examples.column("text").to_pylist(), strict=True))
    topic = dict(zip(examples.column("example_id").to_pylist(), examples.column("topic").to_pylist(), strict=True))
    rows = selection.to_pylist()
    sets: Mapping[str, list[dict[str, object]]] = {
        name: sorted((r for r in rows if r["set"] == name), key=lambda r: r["rank"]) for name in ("large", "ctrl")
    }
    lines = [f"# Inputs that quantization breaks: {model}", ""]
    if note:
        lines += [f"*{note}*", ""]
    lines += [
        f"{len(ids)} evaluation examples, {len(methods)} methods. Error e(x) = NLL_q(x) − NLL_fp(x) in nats per "
        f"token; examples are ranked by the error averaged over methods. D_large: {len(sets['large'])} examples "
        f"(top errors, near-duplicates removed); D_ctrl: {len(sets['ctrl'])} random low-error examples.",
        "",
        "## Per method",
        "",
        "| method | bits | mean error | D_large | D_ctrl | perplexity FP → quantized |",
        "|---|---:|---:|---:|---:|---|",
    ]
    fp_all = np.array([nll_fp[int(i)] for i in ids.tolist()])
    for m in methods:
        large = [m.error[position[int(r["example_id"])]] for r in sets["large"]]
        ctrl = [m.error[position[int(r["example_id"])]] for r in sets["ctrl"]]
        ppl_fp, ppl_q = math.exp(fp_all.mean()), math.exp((fp_all + m.error).mean())
        lines.append(
            f"| {m.method} | {m.bits} | {m.error.mean():.3f} | {_mean(large)} | {_mean(ctrl)} | "
            f"{ppl_fp:.2f} → {ppl_q:.2f} |"
        )
    titles = {"large": "D_large: the most broken inputs", "ctrl": "D_ctrl: random low-error inputs, for contrast"}
    for name, title in titles.items():
        lines += ["", f"## {title}", ""]
        for r in sets[name][:n_show]:
            example_id = int(r["example_id"])
            per_method = ", ".join(f"{m.method} {m.error[position[example_id]]:+.3f}" for m in methods)
            lines += [
                f"### rank {r['rank']}: example {example_id} ({topic.get(example_id) or 'no topic'})",
                "",
                f"mean error {r['mean_error']:+.3f}, FP NLL {nll_fp[example_id]:.3f}; {per_method}",
                "",
                _quote(_truncate(text[example_id], show_chars)),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _mean(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" if values else "–"
