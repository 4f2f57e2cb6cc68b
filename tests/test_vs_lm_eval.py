"""qbreak's per-example NLL equals lm-eval-harness's loglikelihood_rolling on the same tokens.

bench/vs_lm_eval.py compares their speed; this checks the agreement it relies on (≤ 1e-4 nats).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from qbreak.nll import per_example_nll
from tests.conftest import REPO, perturbed_copy
from tests.test_nll import examples_table, random_rows

pytest.importorskip("lm_eval", reason="the bench extra (pip install -e '.[bench]') is not installed")
sys.path.insert(0, str(REPO / "bench"))
from lm_eval_adapter import lm_eval_nll  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3])
def test_nll_equals_lm_eval_loglikelihood_rolling(
    tiny_llama: torch.nn.Module, bundled_tokenizer, batch_size: int
) -> None:
    # Every example starts with the same start token (lm-eval's prefix_token_id); mixed lengths pad.
    rows = [[0, *row] for row in random_rows(7, 512, [9, 33, 20, 64], seed=4)]
    ours = per_example_nll(tiny_llama, examples_table(rows), "tiny", "fp", batch_size=batch_size)
    theirs = lm_eval_nll(tiny_llama, bundled_tokenizer, rows, batch_size)
    np.testing.assert_allclose(ours.column("nll").to_numpy(), theirs, atol=1e-4, rtol=0)
    # A slightly different model gives different numbers: the agreement is not vacuous.
    other = per_example_nll(perturbed_copy(tiny_llama, 0.05, seed=1), examples_table(rows), "t", "q")
    assert np.abs(other.column("nll").to_numpy() - theirs).max() > 1e-3
