"""D_large / D_ctrl selection, n-gram de-duplication and breaking_examples.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from qbreak.breaking import breaking_examples_markdown
from qbreak.errors import QbreakError
from qbreak.io import SELECTION_SCHEMA
from qbreak.selection import SelectionConfig, dedup_greedy, ngrams, select_examples
from tests.test_correlate import errors_table


def test_ngrams() -> None:
    assert ngrams([1, 2, 3, 4], 3) == {(1, 2, 3), (2, 3, 4)}
    assert ngrams([1, 2], 3) == {(1, 2)}
    assert ngrams([], 5) == set()


def test_dedup_keeps_exactly_the_expected_texts() -> None:
    a = list(range(0, 40))
    a_edit = a[:35] + [900, 901, 902, 903, 904]  # the same text with its end rewritten: 31 of 41 5-grams shared
    b = list(range(100, 140))
    a_window = a[20:] + list(range(200, 220))  # shares a's second half: 16 of 56 5-grams
    c = list(range(300, 340))
    b_far = b[:6] + list(range(500, 534))  # shares two 5-grams with b: Jaccard 2/70, below 0.1
    kept, dropped = dedup_greedy([a, a_edit, b, a_window, c, b_far], n=5, threshold=0.1)
    assert kept == [0, 2, 4, 5]
    assert [(d.index, d.duplicate_of) for d in dropped] == [(1, 0), (3, 0)]
    assert dropped[0].similarity == pytest.approx(31 / 41)
    assert dropped[1].similarity == pytest.approx(16 / 56)
    # a looser threshold keeps the window
    assert dedup_greedy([a, a_window], n=5, threshold=0.3)[0] == [0, 1]


def _corpus(n: int = 200, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    errors = {"gptq": rng.gamma(2.0, 0.1, n), "rtn": rng.gamma(2.0, 0.1, n)}
    ids = np.arange(n) + 10
    table = errors_table(errors, {"gptq": ("gptq", 3), "rtn": ("rtn", 3)}, ids=ids)
    tokens = [[0, *rng.integers(1, 5000, 30).tolist()] for _ in range(n)]
    mean = (errors["gptq"] + errors["rtn"]) / 2
    top = int(np.argmax(mean))
    second = int(np.argsort(-mean)[1])
    tokens[second] = [0, *tokens[top][1:28], 7, 8, 9]  # the second-worst example near-duplicates the worst
    examples = pa.table(
        {
            "example_id": ids.astype(np.int32),
            "topic": ["History"] * n,
            "input_ids": tokens,
            "text": [f"text of example {i}" for i in ids],
        }
    )
    return table, examples


def test_selection_sets_are_disjoint_sized_and_seeded() -> None:
    errors, examples = _corpus()
    config = SelectionConfig(seed=3)
    first = select_examples(errors, examples, "m", config)
    assert first.schema.equals(SELECTION_SCHEMA)
    rows = first.to_pylist()
    by_set = {name: {r["example_id"] for r in rows if r["set"] == name} for name in ("large", "ctrl", "duplicate")}
    assert len(by_set["duplicate"]) == 1 and len(by_set["large"]) == 19  # top 10% = 20, one near-duplicate
    assert len(by_set["ctrl"]) == len(by_set["large"])
    assert not by_set["large"] & by_set["ctrl"]
    ranks = {r["example_id"]: r["rank"] for r in rows}
    assert max(ranks[i] for i in by_set["large"] | by_set["duplicate"]) == 20
    assert min(ranks[i] for i in by_set["ctrl"]) > 100  # bottom half only
    dup = next(r for r in rows if r["set"] == "duplicate")
    assert ranks[dup["duplicate_of"]] == 1 and dup["rank"] == 2 and dup["similarity"] > 0.1
    mean = {r["example_id"]: r["mean_error"] for r in rows}
    assert sorted(mean, key=lambda i: (-mean[i], i))[:3] == sorted(ranks, key=ranks.get)[:3]
    assert select_examples(errors, examples, "m", config).equals(first)
    other = select_examples(errors, examples, "m", dataclasses.replace(config, seed=4))
    assert other.column("set").to_pylist() != first.column("set").to_pylist()


def test_selection_options() -> None:
    errors, examples = _corpus()
    capped = select_examples(errors, examples, "m", SelectionConfig(n_large=5))
    assert capped.column("set").to_pylist().count("large") == 5
    assert capped.column("set").to_pylist().count("ctrl") == 5
    only_gptq = select_examples(errors, examples, "m", SelectionConfig(methods=["gptq"]))
    gptq = errors.filter(pa.compute.equal(errors["method"], "gptq"))
    np.testing.assert_allclose(only_gptq.column("mean_error").to_numpy(), gptq.column("error").to_numpy())
    with pytest.raises(QbreakError, match="analysis.methods: 'awq'"):
        select_examples(errors, examples, "m", SelectionConfig(methods=["awq"]))
    with pytest.raises(QbreakError, match="analysis.ctrl_pool_fraction"):
        select_examples(errors, examples, "m", SelectionConfig(top_fraction=0.5, ctrl_pool_fraction=0.05))


def test_breaking_examples_markdown() -> None:
    errors, examples = _corpus()
    selection = select_examples(errors, examples, "m", SelectionConfig())
    text = breaking_examples_markdown(selection, errors, examples, "m", n_show=3, show_chars=60, note="caveat")
    worst = next(r for r in selection.to_pylist() if r["rank"] == 1)["example_id"]
    assert text.startswith("# Inputs that quantization breaks: m")
    assert "*caveat*" in text and f"text of example {worst}" in text
    assert text.count("### rank") == 6  # 3 of D_large, 3 of D_ctrl
    assert "| gptq | 3 |" in text and "| rtn | 3 |" in text
