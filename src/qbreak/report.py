"""HTML pages for the Snakemake report: the run's overview (caveat, methods, summary tables, config)
and the markdown results (breaking examples, patching table) rendered as pages (no torch).

`snakemake --report` shows HTML and images inline but only links other files, so the tables that
matter are rendered here from the Arrow results.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
from markdown_it import MarkdownIt

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 70em; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
blockquote { border-left: 3px solid #bbb; margin-left: 0; padding-left: 1em; color: #333; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""

# Overview tables: Arrow result name -> (section title, columns shown)
OVERVIEW_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "correlation_summary": (
        "Do methods break the same inputs? (correlation of per-example errors)",
        ("group", "n_pairs", "mean_pearson", "min_pearson", "max_pearson", "mean_spearman", "mean_jaccard"),
    ),
    "predictor": (
        "Predicting D_large from the FP residual stream alone (AUROC)",
        ("method", "predictor", "n", "n_positive", "auroc"),
    ),
    "restore_layers": (
        "Restoring FP layers in the quantized model (perplexity)",
        ("method", "set", "restored", "n", "perplexity"),
    ),
}
QUANT_FIELDS = ("kind", "bits", "group_size", "seconds", "peak_rss_mb")


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub pipe table of `rows` (dicts) restricted to `columns`, floats to `digits` places."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def html_page(title: str, markdown: str) -> str:
    """A standalone HTML page of `markdown` (CommonMark + tables; raw HTML in it is escaped)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


def overview_markdown(
    model: str,
    note: str | None,
    quant: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, pa.Table],
    config_text: str,
) -> str:
    """The overview page: the caveat, what each method ran with, the summary tables and the config."""
    lines = [f"# qbreak results: {model}", ""]
    if note:
        lines += [f"**Caveat.** {note}", ""]
    if quant:
        lines += ["## Quantized models", "", markdown_table(
            [{"method": name, **{k: info.get(k) for k in QUANT_FIELDS}} for name, info in quant.items()],
            ("method", *QUANT_FIELDS), digits=1,
        ), ""]
    for name, (title, columns) in OVERVIEW_TABLES.items():
        if name in tables:
            lines += [f"## {title}", "", markdown_table(tables[name].to_pylist(), columns), ""]
    lines += ["## Configuration used", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)

