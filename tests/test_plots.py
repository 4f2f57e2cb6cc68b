"""Figures are drawn from the Arrow tables, written as PNG and SVG, byte-identical on reruns."""

from __future__ import annotations

from pathlib import Path

from qbreak.correlate import correlation_table
from qbreak.plots import correlation_heatmap, error_distributions, error_scatter, save_figure
from tests.test_correlate import _three_methods


def test_figures_are_written_and_reproducible(tmp_path: Path) -> None:
    errors, _ = _three_methods(60)
    corr = correlation_table(errors, {}, "m", n_boot=100)
    digests = []
    for attempt in range(2):
        for name, figure in (
            ("heatmap", correlation_heatmap(corr, errors, "m")),
            ("scatter", error_scatter(corr, errors, "m")),
            ("distributions", error_distributions(errors, "m")),
        ):
            save_figure(figure, tmp_path / f"{name}{attempt}.png", tmp_path / f"{name}{attempt}.svg")
        digests.append([(tmp_path / f"{n}{attempt}.svg").read_bytes() for n in ("heatmap", "scatter", "distributions")])
    assert digests[0] == digests[1]
    assert all((tmp_path / f"{n}0.png").read_bytes()[:4] == b"\x89PNG" for n in ("heatmap", "scatter", "distributions"))
    heatmap = (tmp_path / "heatmap0.svg").read_text()
    assert "gptq-w3" in heatmap and "rtn-w4" in heatmap
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
