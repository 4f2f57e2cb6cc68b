"""KL of quantized vs FP next-token distributions from the side-by-side pass."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from qbreak.errors import QbreakError
from qbreak.kl import compare_to_fp, fp_topk_reference, score_against_reference, topk_kl
from qbreak.passes import iter_batches
from qbreak.nll import per_example_nll
from tests.conftest import make_tiny_llama


def _examples(n: int = 10, max_len: int = 20, vocab: int = 512, seed: int = 0) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, max_len + 1, (n,), generator=g).tolist()
    rows = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]
    return pa.table({"example_id": list(range(100, 100 + n)), "input_ids": rows})


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    fp = make_tiny_llama(seed=1)
    # Sharpen the random model's distributions so that top-k captures most of the mass.
    with torch.no_grad():
        fp.lm_head.weight.mul_(40.0)
    q = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in q.model.layers.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return fp, q


def _reference_kl(fp: torch.nn.Module, q: torch.nn.Module, examples: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Mean token KL both ways from the models' own full logits, one example at a time."""
    forward, backward = [], []
    for row in examples.column("input_ids").to_pylist():
        ids = torch.tensor([row])
        with torch.no_grad():
            lp = torch.log_softmax(fp(ids).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(q(ids).logits[0, :-1].double(), -1)
        forward.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
        backward.append((lq.exp() * (lq - lp)).sum(-1).mean().item())
    return np.array(forward), np.array(backward)


def test_kl_is_zero_for_the_fp_model_itself(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = models
    _, kl = compare_to_fp(fp, fp, _examples(), "tiny", "same", batch_size=3)
    for column in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"):
        values = kl.column(column).to_numpy()
        assert (values >= 0).all() and values.max() <= 1e-6, column


def test_kl_and_nll_match_full_logits(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = models
    examples = _examples()
    nll, kl = compare_to_fp(fp, q, examples, "tiny", "noisy", batch_size=4, topk=8)
    forward, backward = _reference_kl(fp, q, examples)
    np.testing.assert_allclose(kl.column("kl_fp_q").to_numpy(), forward, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(kl.column("kl_q_fp").to_numpy(), backward, rtol=1e-3, atol=1e-7)
    assert forward.min() > 1e-4  # the perturbation is visible, so the comparison means something
    own = per_example_nll(q, examples, "tiny", "noisy", batch_size=5)
    np.testing.assert_allclose(nll.column("nll").to_numpy(), own.column("nll").to_numpy(), atol=1e-5)
    assert kl.column("example_id").to_pylist() == examples.column("example_id").to_pylist()
    assert set(kl.column("topk").to_pylist()) == {8}


def test_kl_is_independent_of_batch_size(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = models
    examples = _examples()
    _, one = compare_to_fp(fp, q, examples, "tiny", "noisy", batch_size=1)
    _, many = compare_to_fp(fp, q, examples, "tiny", "noisy", batch_size=7)
    for column in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk"):
        np.testing.assert_allclose(one.column(column).to_numpy(), many.column(column).to_numpy(), rtol=1e-4, atol=1e-8)


def test_topk_kl_is_a_lower_bound_that_tightens_with_k(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = models
    examples = _examples()
    exact = None
    previous = np.zeros(examples.num_rows)
    for k in (1, 8, 64, 512):
        _, kl = compare_to_fp(fp, q, examples, "tiny", "noisy", batch_size=4, topk=k)
        exact = kl.column("kl_fp_q").to_numpy()
        approx = kl.column("kl_fp_q_topk").to_numpy()
        assert (approx <= exact * (1 + 1e-4) + 1e-9).all(), k
        assert (approx >= previous - 1e-9).all(), k
        previous = approx
    np.testing.assert_allclose(previous, exact, rtol=1e-4)  # k = vocabulary: exact


def test_topk_kl_merges_the_tail_into_one_outcome() -> None:
    # P = (0.5, 0.3, 0.2), Q = (0.2, 0.3, 0.5); top-2 of P plus the merged tail is exact for 3 outcomes.
    p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.2, 0.3, 0.5]]).log()
    expected = float((p.double().exp() * (p.double() - q.double())).sum())
    assert topk_kl(p[:, :2], q[:, :2]).item() == pytest.approx(expected, rel=1e-6)


def test_fp_reference_scores_like_the_side_by_side_pass(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = models
    examples = _examples()
    _, kl = compare_to_fp(fp, q, examples, "tiny", "noisy", batch_size=4, topk=16)
    reference = fp_topk_reference(fp, examples, "tiny", batch_size=3, topk=16)
    assert reference.column("example_id").to_pylist() == examples.column("example_id").to_pylist()
    scored = score_against_reference(q, examples, reference, batch_size=5)
    np.testing.assert_allclose(
        [scored[i] for i in examples.column("example_id").to_pylist()],
        kl.column("kl_fp_q_topk").to_numpy(),
        rtol=1e-5,
        atol=1e-9,
    )
    with pytest.raises(QbreakError, match="no row for example"):
        score_against_reference(q, _examples(seed=3).slice(0, 2).set_column(0, "example_id", pa.array([7, 8])), reference)


def test_topk_must_be_positive(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = models
    with pytest.raises(QbreakError, match="kl.topk"):
        compare_to_fp(fp, q, _examples(), "tiny", "noisy", topk=0)


def test_online_head_divergences_equal_the_full_logit_path() -> None:
    from qbreak.kl import head_divergences, token_divergences

    g = torch.Generator().manual_seed(5)
    head_fp, head_q = torch.nn.Linear(16, 101), torch.nn.Linear(16, 101)
    with torch.no_grad():
        head_fp.weight.copy_(3 * torch.randn(101, 16, generator=g))
        head_q.weight.copy_(head_fp.weight + 0.3 * torch.randn(101, 16, generator=g))
    states_fp, states_q = torch.randn(23, 16, generator=g), torch.randn(23, 16, generator=g)
    targets = torch.randint(0, 101, (23,), generator=g)
    full = token_divergences(head_fp(states_fp).detach(), head_q(states_q).detach(), targets, topk=8)
    # Blocks smaller than k, not dividing the vocabulary, and one block for everything.
    for block in (3, 7, 40, 101, 4096):
        online = head_divergences(states_fp, head_fp, states_q, head_q, targets, topk=8, vocab_block=block)
        for name, value in full.items():
            torch.testing.assert_close(online[name].double(), value.double(), atol=2e-5, rtol=1e-5, msg=name)


def test_group_head_divergences_equal_one_call_per_model() -> None:
    """The FP head's blocks computed once for three quantized heads (one with a bias, one far off):
    every model's values equal its own head_divergences call bit for bit."""
    from qbreak.kl import group_head_divergences, head_divergences

    g = torch.Generator().manual_seed(6)
    head_fp = torch.nn.Linear(16, 203, bias=False)
    with torch.no_grad():
        head_fp.weight.copy_(3 * torch.randn(203, 16, generator=g))
    states_fp = torch.randn(29, 16, generator=g)
    quantized = []
    for i, bias in enumerate((False, True, False)):
        head = torch.nn.Linear(16, 203, bias=bias)
        with torch.no_grad():
            head.weight.copy_(head_fp.weight + 0.2 * (i + 1) * torch.randn(203, 16, generator=g))
        quantized.append((states_fp + 0.1 * torch.randn(29, 16, generator=g), head))
    targets = torch.randint(0, 203, (29,), generator=g)
    for block in (5, 64, 4096):
        group = group_head_divergences(states_fp, head_fp, quantized, targets, topk=8, vocab_block=block)
        assert len(group) == 3
        for (states_q, head_q), values in zip(quantized, group, strict=True):
            alone = head_divergences(states_fp, head_fp, states_q, head_q, targets, topk=8, vocab_block=block)
            for name, value in alone.items():
                assert torch.equal(values[name], value), (block, name)
        assert group[2]["kl_fp_q"].mean() > group[0]["kl_fp_q"].mean() > 0  # the further model is further
    with pytest.raises(ValueError, match="vocabularies differ"):
        group_head_divergences(states_fp, head_fp, [(states_fp, torch.nn.Linear(16, 7))], targets, topk=8)


def test_group_statistic_without_a_plain_head_takes_the_full_logit_path(
    models: tuple[torch.nn.Module, torch.nn.Module],
) -> None:
    """A model whose logits are transformed after lm_head (here logit_scale) has no online head: the
    group statistic scores each method from full logits, as CompareStatistic does."""
    from qbreak.kl import GroupCompareStatistic
    from qbreak.passes import run_group_pass

    fp, q = models
    scaled = copy.deepcopy(q)
    scaled.config.logit_scale = 0.5  # has_plain_lm_head → False
    examples = _examples(n=5)
    group = GroupCompareStatistic("tiny", ["q", "scaled"], topk=8)
    run_group_pass(fp, [q, scaled], iter_batches(examples, 2), [[], []], group_statistics=[group], streams=1)
    for name, model in (("q", q), ("scaled", scaled)):
        nll, kl = compare_to_fp(fp, model, examples, "tiny", name, batch_size=2, topk=8, streams=1)
        assert group.methods[name].nll_table().equals(nll) and group.methods[name].kl_table().equals(kl)
