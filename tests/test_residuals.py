"""Hook points, residual statistics, amplification, logit lens and layer restoring on a tiny Llama."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from qbreak.errors import QbreakError
from qbreak.hooks import decoder_layers, hooks
from qbreak.lens import logit_lens, parse_layer_ranges, restore_table, with_restored_layers
from qbreak.nll import NLLStatistic, per_example_nll
from qbreak.passes import iter_batches, run_pair_pass, run_pass
from qbreak.residuals import AmplificationStatistic, ResidualStatistic, token_norm_kurtosis
from tests.conftest import make_tiny_llama, perturbed_copy
from tests.test_kl import _examples


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    fp = make_tiny_llama(seed=3)
    return fp, perturbed_copy(fp, scale=0.1, seed=4)


def capture(store: dict[str, torch.Tensor], key: str):  # noqa: ANN201
    """A hook that keeps a copy of the activation it sees."""

    def hook(x: torch.Tensor) -> None:
        store[key] = x.clone()

    return hook


def test_token_norm_kurtosis_matches_float64_definition() -> None:
    """Per-example means over the masked tokens of ‖a‖ and E[(a − ā)⁴] / E[(a − ā)²]², in float64 numpy."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 40, generator=gen) * 2 + 0.7
    x[..., 5] *= 30  # an outlier dimension: kurtosis far above a Gaussian's 3
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 4:] = False
    norm, kurtosis = token_norm_kurtosis(x, mask)
    a = x.double().numpy()
    centered = a - a.mean(axis=-1, keepdims=True)
    token_kurtosis = (centered**4).mean(axis=-1) / (centered**2).mean(axis=-1) ** 2
    token_norm = np.linalg.norm(a, axis=-1)
    m = mask.numpy()
    for i in range(3):
        assert norm[i].item() == pytest.approx(token_norm[i][m[i]].mean(), rel=1e-6)
        assert kurtosis[i].item() == pytest.approx(token_kurtosis[i][m[i]].mean(), rel=1e-5)
    assert (kurtosis > 10).all()


def _residual_table(model: torch.nn.Module, examples: pa.Table, batch_size: int) -> pa.Table:
    stat = ResidualStatistic("tiny", "fp")
    run_pass(model, iter_batches(examples, batch_size), [stat])
    return stat.result()


def test_block_out_norms_match_output_hidden_states(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    examples = _examples(n=5)
    table = _residual_table(fp, examples, batch_size=2)
    data = table.to_pydict()
    for example_id, row in zip(examples.column("example_id").to_pylist(), examples.column("input_ids").to_pylist(), strict=True):
        with torch.no_grad():
            states = fp(torch.tensor([row]), output_hidden_states=True).hidden_states
        mask = torch.ones(1, len(row), dtype=torch.bool)
        mask[0, 0] = False
        # hidden_states[l + 1] is layer l's output except for the last entry, which is after the final norm
        for layer in range(len(states) - 2):
            norm, kurt = token_norm_kurtosis(states[layer + 1], mask)
            k = next(
                k for k in range(table.num_rows)
                if data["example_id"][k] == example_id and data["layer"][k] == layer and data["site"][k] == "block_out"
            )
            assert data["norm"][k] == pytest.approx(norm.item(), rel=1e-5)
            assert data["kurtosis"][k] == pytest.approx(kurt.item(), rel=1e-4)


def test_post_norm_is_the_rmsnorm_of_pre_norm(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    captured: dict[str, torch.Tensor] = {}
    fns = {(1, "pre_norm"): capture(captured, "pre"), (1, "post_norm"): capture(captured, "post")}
    with torch.no_grad(), hooks(fp, fns):
        fp(torch.tensor([[1, 2, 3, 4, 5]]))
    norm = decoder_layers(fp)[1].post_attention_layernorm
    torch.testing.assert_close(norm(captured["pre"]), captured["post"])


def test_residual_statistics_are_independent_of_batching(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    examples = _examples(n=7)
    one, many = _residual_table(fp, examples, 1), _residual_table(fp, examples, 4)
    key = lambda t: sorted(zip(t["example_id"].to_pylist(), t["layer"].to_pylist(), t["site"].to_pylist(),  # noqa: E731
                               t["norm"].to_pylist(), t["kurtosis"].to_pylist(), strict=True))
    for a, b in zip(key(one), key(many), strict=True):
        assert a[:3] == b[:3]
        assert a[3] == pytest.approx(b[3], rel=1e-5) and a[4] == pytest.approx(b[4], rel=1e-4)
    assert one.num_rows == 7 * 2 * 3


def test_hooks_are_removed_also_when_the_forward_raises(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair

    def count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in fp.modules())

    def boom(x: torch.Tensor) -> None:
        raise RuntimeError("boom")

    before = count()
    with pytest.raises(RuntimeError, match="boom"), hooks(fp, {(0, "down"): boom, (1, "pre_norm"): lambda x: None}):
        assert count() == before + 2
        fp(torch.tensor([[1, 2, 3]]))
    assert count() == before
    with pytest.raises(QbreakError, match="unknown hook site"), hooks(fp, {(0, "nowhere"): lambda x: None}):
        pass
    assert count() == before


def test_a_hook_can_replace_an_activation(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = fp(ids).logits
        with hooks(fp, {(1, "down"): lambda x: torch.zeros_like(x), (1, "attn"): lambda x: torch.zeros_like(x)}):
            skipped = fp(ids).logits
        # zero attention and MLP output in the last layer = its output equals its input
        states = fp(ids, output_hidden_states=True).hidden_states
        expected = fp.lm_head(fp.model.norm(states[1]))
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(plain, skipped)


def test_amplification_compares_mlps_on_the_same_input(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    examples = _examples(n=4)
    same = AmplificationStatistic("tiny", "same", fp)
    noisy = AmplificationStatistic("tiny", "noisy", q)
    run_pass(fp, iter_batches(examples, 3), [same, noisy])
    assert np.abs(same.result().column("mlp_mse").to_numpy()).max() == 0.0
    result = noisy.result()
    assert (result.column("mlp_mse").to_numpy() > 0).all()
    # manual check: layer 0, first example
    row = examples.column("input_ids")[0].as_py()
    captured: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooks(fp, {(0, "pre_norm"): capture(captured, "r")}):
        fp(torch.tensor([row]))
        r = captured["r"][0, 1:]
        fp_layer, q_layer = decoder_layers(fp)[0], decoder_layers(q)[0]
        y_q = q_layer.mlp(q_layer.post_attention_layernorm(r))
        expected = (y_q - fp_layer.mlp(fp_layer.post_attention_layernorm(r))).pow(2).mean().item()
    data = result.to_pydict()
    k = next(k for k in range(result.num_rows) if data["example_id"][k] == 100 and data["layer"][k] == 0)
    assert data["mlp_mse"][k] == pytest.approx(expected, rel=1e-4)


def test_amplification_is_zero_for_a_scale_fold_that_keeps_the_function(
    pair: tuple[torch.nn.Module, torch.nn.Module],
) -> None:
    """AWQ folds per-channel scales s into the model: the MLP's RMSNorm γ / s, gate and up input
    columns · s. Without quantization that is the same function, so the amplification (what the
    quantized weights do to the MLP's output) must be 0, not the fold's change of the MLP's input."""
    fp, _ = pair
    folded = copy.deepcopy(fp)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in decoder_layers(folded):
            s = 0.5 + 1.5 * torch.rand(layer.post_attention_layernorm.weight.shape, generator=generator)
            layer.post_attention_layernorm.weight.div_(s)
            layer.mlp.gate_proj.weight.mul_(s)
            layer.mlp.up_proj.weight.mul_(s)
    examples = _examples(n=4)
    amplification = AmplificationStatistic("tiny", "awq-fold", folded)
    residuals = ResidualStatistic("tiny", "awq-fold")
    # the folded model's own residual statistics run beside it and must not see the FP residuals
    run_pair_pass(fp, folded, iter_batches(examples, 3), [], fp_statistics=[amplification], q_statistics=[residuals])
    result = amplification.result()
    relative = result.column("mlp_mse").to_numpy() / result.column("mlp_power").to_numpy()
    assert relative.max() < 1e-10
    alone = _residual_table(folded, examples, 3)
    np.testing.assert_array_equal(residuals.result().column("norm").to_numpy(), alone.column("norm").to_numpy())


def test_pair_pass_feeds_observers_of_each_model(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    examples = _examples(n=4)
    fp_stat, q_stat = ResidualStatistic("tiny", "fp"), ResidualStatistic("tiny", "q")
    run_pair_pass(fp, q, iter_batches(examples, 2), [], fp_statistics=[fp_stat], q_statistics=[q_stat])
    np.testing.assert_allclose(fp_stat.result().column("norm").to_numpy(), _residual_table(fp, examples, 2).column("norm").to_numpy())
    assert not np.allclose(fp_stat.result().column("norm").to_numpy(), q_stat.result().column("norm").to_numpy())


def test_logit_lens_at_the_last_layer_is_the_model_nll(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    examples = _examples(n=6)
    lens = logit_lens(fp, examples, "tiny", "fp", batch_size=4)
    own = per_example_nll(fp, examples, "tiny", "fp", batch_size=4).column("nll").to_numpy()
    last = lens.filter(pa.compute.equal(lens["layer"], 1)).column("nll").to_numpy()
    np.testing.assert_allclose(last, own, rtol=1e-6)
    first = lens.filter(pa.compute.equal(lens["layer"], 0)).column("nll").to_numpy()
    assert not np.allclose(first, own)
    with pytest.raises(QbreakError, match="residuals.lens_layers"):
        logit_lens(fp, examples, "tiny", "fp", layers=[5])


def test_restoring_all_layers_is_fp_and_none_is_quantized(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    examples = _examples(n=5)
    table = restore_table(q, fp, examples, "tiny", "q", {"all": [0, 1], "none": [], "last": [1]}, batch_size=2)
    rows = table.to_pydict()

    def nll(label: str) -> np.ndarray:
        return np.array([v for v, r in zip(rows["nll"], rows["restored"], strict=True) if r == label])
    np.testing.assert_array_equal(nll("all"), per_example_nll(fp, examples, "tiny", "fp", 2).column("nll").to_numpy())
    np.testing.assert_array_equal(nll("none"), per_example_nll(q, examples, "tiny", "q", 2).column("nll").to_numpy())
    assert not np.allclose(nll("last"), nll("none"))
    assert with_restored_layers(q, fp, [0]) is not q  # the quantized model itself is untouched


def test_layer_ranges() -> None:
    assert parse_layer_ranges(None, 30, "k") == {"23-29": list(range(23, 30))}
    assert parse_layer_ranges([[-2, -1], [0, 0]], 4, "k") == {"2-3": [2, 3], "0-0": [0]}
    with pytest.raises(QbreakError, match="config key k"):
        parse_layer_ranges([[3, 9]], 4, "k")


def test_nll_statistic_unchanged_by_observers(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, _ = pair
    examples = _examples(n=5)
    alone, observed = NLLStatistic("tiny", "fp"), NLLStatistic("tiny", "fp")
    run_pass(fp, iter_batches(examples, 2), [alone])
    run_pass(fp, iter_batches(examples, 2), [observed, ResidualStatistic("tiny", "fp")])
    np.testing.assert_array_equal(alone.result().column("nll").to_numpy(), observed.result().column("nll").to_numpy())


def test_statistics_memory_does_not_grow_with_seq_len(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    """What a residual statistic keeps is O(examples × layers × sites), whatever the sequence length."""
    fp, q = pair

    def kept_bytes(max_len: int) -> int:
        examples = _examples(n=6, max_len=max_len)
        residuals, amplification = ResidualStatistic("tiny", "fp"), AmplificationStatistic("tiny", "q", q)
        run_pass(fp, iter_batches(examples, 3), [residuals, amplification])
        return residuals.result().nbytes + amplification.result().nbytes + sum(
            a.nbytes for a in residuals.mean_abs_per_dim().values()
        )

    assert kept_bytes(12) == kept_bytes(120)
