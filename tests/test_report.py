"""The report pages: tables rendered from Arrow, the caveat, the config, and escaped raw HTML."""

from __future__ import annotations

import pyarrow as pa

from qbreak.io import PREDICTOR_SCHEMA
from qbreak.report import html_page, markdown_table, overview_markdown


def test_markdown_table_formats_floats_missing_values_and_pipes() -> None:
    text = markdown_table([{"a": 1.23456, "b": None, "c": "x|y"}, {"a": float("nan"), "b": 3, "c": "z"}], ["a", "b", "c"], 2)
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.23 | – | x\\|y |", "| – | 3 | z |"]


def test_overview_has_caveat_methods_tables_and_config() -> None:
    predictor = pa.Table.from_pylist(
        [{"model": "m", "method": "rtn-w3", "predictor": "final_norm", "n": 40, "n_positive": 4, "auroc": 0.8125}],
        schema=PREDICTOR_SCHEMA,
    )
    quant = {"rtn-w3": {"kind": "rtn", "bits": 3, "group_size": 64, "seconds": 12.345, "peak_rss_mb": 900.0}}
    page = html_page("t", overview_markdown("m", "Weights were Q4_1.", quant, {"predictor": predictor}, "seed: 0\n"))
    assert "<strong>Caveat.</strong> Weights were Q4_1." in page
    assert "<td>rtn-w3</td>\n<td>rtn</td>\n<td>3</td>\n<td>64</td>\n<td>12.3</td>" in page
    assert "<td>0.812</td>" in page and "AUROC" in page
    assert "Do methods break the same inputs?" not in page  # only the tables that exist
    assert '<code class="language-yaml">seed: 0' in page


def test_html_page_escapes_raw_html_from_example_text() -> None:
    page = html_page("x", "> an example with <script>alert(1)</script> in it")
    assert "<script>" not in page and "&lt;script&gt;" in page
