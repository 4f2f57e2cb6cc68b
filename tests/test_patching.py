"""FP → quantized activation patching: identities that must hold, and fast sweep = naive sweep."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from qbreak.errors import QbreakError
from qbreak.hooks import hooks
from qbreak.io import PATCH_SUMMARY_SCHEMA
from qbreak.nll import per_example_nll
from qbreak.patching import Patch, build_patches, patching_table, upper_half
from qbreak.patching_summary import UP_SITE_NOTE, patching_markdown
from qbreak.passes import iter_batches
from tests.conftest import REPO, make_tiny_llama, perturbed_copy
from tests.test_kl import _examples
from tests.test_residuals import capture


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    fp = make_tiny_llama(seed=5)
    return fp, perturbed_copy(fp, scale=0.2, seed=6)


def _nll(table, site: str, label: str) -> np.ndarray:  # noqa: ANN001
    rows = table.filter(pc.and_(pc.equal(table["site"], site), pc.equal(table["layers"], label)))
    return rows.column("nll").to_numpy()


def test_patch_identities(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    examples = _examples(n=6)
    patches = [Patch("none", (), "none"), Patch("resid", (0, 1), "all"), Patch("resid", (1,), "1")]
    table = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=4)
    fp_nll = per_example_nll(fp, examples, "tiny", "fp", 4).column("nll").to_numpy()
    q_nll = per_example_nll(q, examples, "tiny", "q", 4).column("nll").to_numpy()
    np.testing.assert_allclose(_nll(table, "resid", "all"), fp_nll, atol=1e-5)
    np.testing.assert_allclose(_nll(table, "resid", "1"), fp_nll, atol=1e-5)  # the last layer's output is FP's
    np.testing.assert_array_equal(_nll(table, "none", "none"), q_nll)
    assert np.abs(fp_nll - q_nll).min() > 1e-4


def test_patching_leaves_earlier_layers_untouched(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    plain: dict[str, torch.Tensor] = {}
    patched: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with hooks(q, {(0, "block_out"): capture(plain, "0"), (1, "block_out"): capture(plain, "1")}):
            q(ids)
        with hooks(fp, {(1, "down"): capture(plain, "fp_down")}):
            fp(ids)
        fns = {(0, "block_out"): capture(patched, "0"), (1, "block_out"): capture(patched, "1"),
               (1, "down"): lambda x: plain["fp_down"]}
        with hooks(q, fns):
            q(ids)
    torch.testing.assert_close(patched["0"], plain["0"], rtol=0, atol=0)
    assert not torch.allclose(patched["1"], plain["1"])


@pytest.mark.parametrize("site", ["attn", "gate", "up", "down", "gate_input"])
def test_fast_sweep_equals_naive(pair: tuple[torch.nn.Module, torch.nn.Module], site: str) -> None:
    fp, q = pair
    examples = _examples(n=5)
    patches = build_patches(2, [site], sweep_layers=[0, 1], ranges=[[0, 0]])
    fast = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=3, fast=True)
    naive = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=3, fast=False)
    np.testing.assert_allclose(fast.column("nll").to_numpy(), naive.column("nll").to_numpy(), atol=1e-5)
    unpatched = _nll(fast, "none", "none")
    for label in ("0", "1", "1-1"):
        assert np.abs(_nll(fast, site, label) - unpatched).max() > 1e-6, label  # every patch changes something
    alone = patching_table(fp, q, examples, "tiny", "q", [patches[-1]], batch_size=3, fast=False)  # no "none"
    np.testing.assert_allclose(alone.column("nll").to_numpy(), _nll(fast, patches[-1].site, patches[-1].label),
                               atol=1e-5)


def test_gate_weights_restore_and_gate_input(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    fp, q = pair
    examples = _examples(n=4)
    patches = build_patches(2, ["gate", "gate_input"], None, None, weight_sites=["gate_weights"])
    table = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=4)
    assert set(table.column("site").to_pylist()) == {"none", "gate", "gate_input", "gate_weights"}
    assert set(table.column("layers").to_pylist()) == {"none", "1-1"}
    weights = _nll(table, "gate_weights", "1-1")
    hybrid = copy.deepcopy(q)
    hybrid.model.layers[1].mlp.gate_proj.load_state_dict(fp.model.layers[1].mlp.gate_proj.state_dict())
    np.testing.assert_allclose(weights, per_example_nll(hybrid, examples, "tiny", "h", 4).column("nll").to_numpy())
    assert not np.allclose(_nll(table, "gate", "1-1"), _nll(table, "gate_input", "1-1"))


def test_patch_sets() -> None:
    assert upper_half(30) == tuple(range(15, 30))
    patches = build_patches(4, ["attn", "resid"], sweep_layers=[1, 3], ranges=[[-1, -1]])
    keys = [(p.site, p.label) for p in patches]
    assert keys == [("none", "none"), ("attn", "2-3"), ("attn", "3-3"), ("resid", "2-3"), ("resid", "3-3"),
                    ("attn", "1"), ("attn", "3")]
    with pytest.raises(QbreakError, match="patching.sites"):
        build_patches(4, ["mlp"], None, None)
    with pytest.raises(QbreakError, match="patching.sweep_layers"):
        build_patches(4, ["attn"], [4], None)
    assert len(list(iter_batches(_examples(n=3), 2))) == 2


def test_awq_skips_the_sites_its_scales_rescale() -> None:
    from qbreak.patching import valid_sites

    sites = ["attn", "gate", "up", "down", "gate_input", "resid", "gate_weights"]
    assert valid_sites(sites, "awq") == ["attn", "gate", "down", "resid"]
    assert valid_sites(sites, "gptq") == sites


@pytest.mark.parametrize("fast", [True, False])
def test_two_streams_equal_one(pair: tuple[torch.nn.Module, torch.nn.Module], fast: bool) -> None:
    """Patches scored on two streams (each with its own patch hooks on the shared model) give one stream's table."""
    fp, q = pair
    examples = _examples(n=7)
    patches = build_patches(2, ["attn", "down", "gate_input", "resid"], sweep_layers=[0, 1], ranges=[[0, 1]],
                            weight_sites=["up_weights"])
    one = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=3, fast=fast, streams=1)
    two = patching_table(fp, q, examples, "tiny", "q", patches, batch_size=3, fast=fast, streams=2)
    assert one.equals(two)
    assert len(set(np.round(one.column("nll").to_numpy(), 6))) > len(patches) // 2  # the patches differ


def test_thread_hooks_keep_each_threads_functions(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    """Two threads run the same model at once, each with its own replacement at one site, many times."""
    from concurrent.futures import ThreadPoolExecutor

    from qbreak.hooks import ThreadHooks

    _, q = pair
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    thread_hooks = ThreadHooks()

    def run(scale: float) -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode(), thread_hooks.use({(0, "down"): lambda x: x * scale}):
            for _ in range(20):
                outs.append(q(ids).logits)
        return outs

    with torch.inference_mode():
        expected = {}
        for scale in (0.0, 2.0):
            with hooks(q, {(0, "down"): lambda x, s=scale: x * s}):
                expected[scale] = q(ids).logits
        plain = q(ids).logits
    with thread_hooks.attach(q, [(0, "down")]), ThreadPoolExecutor(2) as pool:
        results = dict(zip((0.0, 2.0), pool.map(run, (0.0, 2.0)), strict=True))
        with torch.inference_mode():
            torch.testing.assert_close(q(ids).logits, plain, rtol=0, atol=0)  # no function here: unhooked
    assert not torch.allclose(expected[0.0], expected[2.0])
    with pytest.raises(ValueError, match="not attached"), thread_hooks.use({(1, "down"): lambda x: x}):
        pass
    for scale, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[scale], rtol=0, atol=0)


def test_up_patch_probe_identities(pair: tuple[torch.nn.Module, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/up_patch_probe.py: with no perturbation every frozen site gives FP's NLL and no drift;
    its perturbed FP run equals the patching module's `resid` patch of the other model's layer
    output, and freezing any site changes it."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from up_patch_probe import FROZEN_SITES, frozen_site_runs

    fp, q = pair
    examples = _examples(n=6)
    fp_nll = per_example_nll(fp, examples, "tiny", "fp", 4).column("nll").to_numpy()
    perturbed = patching_table(q, fp, examples, "tiny", "fp", [Patch("resid", (0,), "0")], batch_size=4)
    for batch_index, batch in enumerate(iter_batches(examples, 4)):
        rows = slice(4 * batch_index, 4 * batch_index + len(batch.example_ids))
        clean = frozen_site_runs(fp, fp, batch, [1])
        mixed = frozen_site_runs(fp, q, batch, [1])
        assert set(clean) == set(mixed) == set(FROZEN_SITES)
        for site, (total, n, drift) in clean.items():
            np.testing.assert_allclose((total / n).numpy(), fp_nll[rows], rtol=0, atol=1e-6, err_msg=site)
            assert drift.tolist() == [0.0], site
        total, n, drift = mixed["none"]
        np.testing.assert_allclose((total / n).numpy(), _nll(perturbed, "resid", "0")[rows], rtol=0, atol=1e-5)
        assert drift.item() > 1e-3
        for site in FROZEN_SITES[1:]:  # each freeze changes the perturbed run
            assert np.abs((mixed[site][0] - total).numpy()).max() > 1e-4, site
            assert abs(mixed[site][2].item() - drift.item()) > 1e-4, site


def test_up_patch_probe_mlp_paths(pair: tuple[torch.nn.Module, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's two MLP paths sum to the MLP's change for a small input step (first order), the up
    path is exactly the change with the gate held, and no perturbation gives no response."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from up_patch_probe import linear_mlp_response, mlp_paths

    fp, q = pair
    mlp = fp.model.layers[1].mlp
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 64, generator=generator)
    dx = 1e-3 * torch.randn(20, 64, generator=generator)
    with torch.inference_mode():
        paths = mlp_paths(mlp, x, dx)
        change = mlp(x + dx) - mlp(x)
        held_gate = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x + dx)) - mlp(x)
    assert ((paths["gate"] + paths["up"] - change).norm() / change.norm()).item() < 1e-2
    torch.testing.assert_close(paths["up"], held_gate, rtol=1e-3, atol=1e-6)
    assert paths["gate"].norm() > 0.1 * change.norm()
    batch = next(iter_batches(_examples(n=4), 4))
    assert all(values == (0.0, 0.0, 0.0) for values in linear_mlp_response(fp, fp, batch, [1]).values())
    moved = linear_mlp_response(fp, q, batch, [1])
    assert set(moved) == {("gate", 1), ("up", 1)} and all(values[1] > 0 for values in moved.values())


def test_patching_markdown_flags_the_up_site() -> None:
    """The Table-4 markdown says how to read an `up` row (bench/up_patch_probe.py), and only when there is one."""
    def table(sites: list[str]) -> pa.Table:
        rows = [
            {"model": "m", "method": "q", "set": name, "site": site, "layers": "–" if site in ("fp", "none") else "1-2",
             "n": 3, "perplexity": 10.0, "recovered": 0.5}
            for site in sites for name in ("large", "ctrl")
        ]
        return pa.Table.from_pylist(rows, schema=PATCH_SUMMARY_SCHEMA)

    with_up = patching_markdown(table(["fp", "none", "gate", "up"]), "m")
    assert "| up | 1-2 | 10.00 | 0.50 | 10.00 | 0.50 |" in with_up and with_up.rstrip().endswith(UP_SITE_NOTE)
    assert UP_SITE_NOTE not in patching_markdown(table(["fp", "none", "gate", "down"]), "m")
