"""FP → quantized activation patching: which activation, put back to its FP value, repairs the inputs
that break?

For a batch, the FP model runs once and its activations at the patched sites are kept (for that
batch only). The quantized model then runs with a hook that replaces its activation at a site and
set of layers by the FP one, and the NLL is scored. Sites (as in the paper's Table 4):

    attn        attention output (before the residual add)
    gate        act(gate_proj(h)), the MLP's gate after its activation
    up          up_proj(h)
    down        down_proj(...), the MLP output
    gate_input  the input of gate_proj only (FP post-norm residual), up_proj keeps the quantized one
    resid       the layer's output residual stream

A per-layer sweep does not pay one full forward per (site, layer): the hidden state entering layer l
is the same for every patch that starts at l, so one unpatched quantized pass records every layer's
input (and the keyword arguments the decoder passes to its layers), and a patch starting at l runs
only layers l … L−1 from there (`fast=True`; `fast=False` is the naive full forward, kept for the
identity tests and the benchmark).

A job given two or more threads on a CPU scores each batch's patches on two 1-thread streams
(`passes.default_streams`), a patch at a time per stream, after the FP and the unpatched quantized
forward (which run side by side). The patch hooks are registered once and each stream sets its own
(`hooks.ThreadHooks`); results equal one stream's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from qbreak.errors import QbreakError
from qbreak.hooks import HookFn, ThreadHooks, decoder_layers, hooks
from qbreak.io import PATCHING_SCHEMA
from qbreak.layers import check_layers, layer_range
from qbreak.nll import batch_nll
from qbreak.passes import Batch, default_streams, final_hidden_state, iter_batches, stream_pool
from qbreak.runtime import ensure_default_float_environment

# patch site -> hook site (hooks.SITES) whose activation is replaced
PATCH_SITES: dict[str, str] = {
    "attn": "attn",
    "gate": "gate",
    "up": "up",
    "down": "down",
    "gate_input": "gate_input",
    "resid": "block_out",
}
WEIGHT_SITES = {"gate_weights": "mlp.gate_proj", "up_weights": "mlp.up_proj", "down_weights": "mlp.down_proj"}
# AWQ folds per-channel scales into the model: post_attention_layernorm's γ is divided by s and the
# gate/up input columns multiplied by it; up_proj's rows are divided by s' and down_proj's columns
# multiplied by it. The MLP input and the up output then live in another basis than FP's, so these
# patches (and FP gate/up/down weights next to AWQ's rescaled neighbours) are meaningless there.
# attn, gate (act(gate)), down (the MLP output) and resid keep FP's basis.
RESCALED_SITES = {"gate_input", "up", "gate_weights", "up_weights", "down_weights"}
RESCALING_KINDS = {"awq"}


def valid_sites(sites: Sequence[str], kind: str) -> list[str]:
    """The sites that compare like with like for a method of `kind` (see RESCALED_SITES)."""
    return [site for site in sites if kind not in RESCALING_KINDS or site not in RESCALED_SITES]


@dataclass(frozen=True)
class Patch:
    """Replace `site` at `layers` by FP's (or, for a *_weights site, put those weights back in FP)."""

    site: str
    layers: tuple[int, ...]
    label: str

    def __post_init__(self) -> None:
        if self.site not in PATCH_SITES and self.site not in WEIGHT_SITES and self.site != "none":
            raise QbreakError(
                f"config key patching.sites: unknown site '{self.site}', expected one of "
                f"{sorted(PATCH_SITES) + sorted(WEIGHT_SITES)}"
            )

    @property
    def key(self) -> str:
        """site/label: the patch's key in `patched_nll`'s results and the hybrid models."""
        return f"{self.site}/{self.label}"


def upper_half(n_layers: int) -> tuple[int, ...]:
    """The paper's default patch set: layers ⌊L/2⌋ … L−1."""
    return tuple(range(n_layers // 2, n_layers))


def build_patches(
    n_layers: int, sites: Sequence[str], sweep_layers: Sequence[int] | None, ranges: Sequence[Sequence[int]] | None,
    weight_sites: Sequence[str] = (),
) -> list[Patch]:
    """The unpatched run, each site on the upper half and on configured ranges, the per-layer sweep,
    and the weight-restore counterparts on the upper half."""
    patches = [Patch("none", (), "none")]
    half = upper_half(n_layers)
    spans = {f"{half[0]}-{half[-1]}": half}
    for entry in ranges or []:
        first, last = layer_range(entry, n_layers, "patching.ranges")
        spans[f"{first}-{last}"] = tuple(range(first, last + 1))
    for site in sites:
        patches += [Patch(site, layers, label) for label, layers in spans.items()]
    check_layers(sweep_layers or [], n_layers, "patching.sweep_layers")
    for layer in sweep_layers or []:
        patches += [Patch(site, (layer,), str(layer)) for site in sites if site != "resid"]
    patches += [Patch(site, half, f"{half[0]}-{half[-1]}") for site in weight_sites]
    return patches


def patch_keys(patches: Sequence[Patch]) -> set[tuple[int, str]]:
    """Every (layer, hook site) some activation patch replaces."""
    return {(layer, PATCH_SITES[p.site]) for p in patches if p.site in PATCH_SITES for layer in p.layers}


def fp_activations(fp_model: torch.nn.Module, batch: Batch, patches: Sequence[Patch]) -> dict[tuple[int, str], torch.Tensor]:
    """FP activations at every (layer, hook site) some patch replaces, for this batch only."""
    needed = patch_keys(patches)
    cache: dict[tuple[int, str], torch.Tensor] = {}
    if not needed:
        return cache

    def keep(key: tuple[int, str]):  # noqa: ANN202 (a hook closure)
        def hook(x: torch.Tensor) -> None:
            cache[key] = x

        return hook

    with hooks(fp_model, {key: keep(key) for key in needed}):
        final_hidden_state(fp_model, batch)
    return cache


def _patch_fns(patch: Patch, cache: Mapping[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], HookFn]:
    if patch.site not in PATCH_SITES:
        return {}
    site = PATCH_SITES[patch.site]
    return {(layer, site): (lambda x, key=(layer, site): cache[key]) for layer in patch.layers}


@contextlib.contextmanager
def layer_inputs(model: torch.nn.Module) -> Iterator[dict[int, tuple[torch.Tensor, dict[str, Any]]]]:
    """Record each decoder layer's hidden-state input and keyword arguments during a forward."""
    inputs: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    layers = decoder_layers(model)
    handles = []

    def record(index: int):  # noqa: ANN202 (a hook closure)
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            inputs[index] = (hidden, rest)

        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(record(index), with_kwargs=True))
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def run_from(model: torch.nn.Module, start: int, inputs: Mapping[int, tuple[torch.Tensor, dict[str, Any]]]) -> torch.Tensor:
    """Final normed hidden state when the decoder resumes at layer `start` from its recorded input."""
    ensure_default_float_environment("patched forward")
    layers = decoder_layers(model)
    hidden = inputs[start][0]
    for index in range(start, len(layers)):
        out = layers[index](hidden, **inputs[index][1])
        hidden = out[0] if isinstance(out, tuple) else out
    return model.get_decoder().norm(hidden)


def with_fp_weights(q_model: torch.nn.Module, fp_model: torch.nn.Module, module: str, layers: Sequence[int]) -> torch.nn.Module:
    """A copy of `q_model` whose `module` (e.g. mlp.gate_proj) in `layers` carries the FP weights."""
    hybrid = copy.deepcopy(q_model)
    for index in layers:
        target, source = decoder_layers(hybrid)[index], decoder_layers(fp_model)[index]
        for part in module.split("."):
            target, source = getattr(target, part), getattr(source, part)
        target.load_state_dict(source.state_dict())
    return hybrid


@torch.inference_mode()
def patched_nll(
    fp_model: torch.nn.Module, q_model: torch.nn.Module, batch: Batch, patches: Sequence[Patch], fast: bool = True,
    hybrids: Mapping[str, torch.nn.Module] | None = None, patch_hooks: ThreadHooks | None = None,
    pool: Executor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """patch key (site/label) → (summed NLL float64 [batch], scored tokens [batch]) for one batch.

    `patch_hooks` must be attached to `q_model` at `patch_keys(patches)` (else this call attaches
    them); with a `pool` of streams (`passes.stream_pool`) the patches run there, in any order.
    """
    if patch_hooks is None:
        patch_hooks = ThreadHooks()
        with patch_hooks.attach(q_model, patch_keys(patches)):
            return patched_nll(fp_model, q_model, batch, patches, fast, hybrids, patch_hooks, pool)
    inputs: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def unpatched_pass() -> torch.Tensor | None:
        if not (fast or any(p.site == "none" for p in patches)):  # the naive path needs it only for the unpatched NLL
            return None
        with layer_inputs(q_model) as recorded:
            hidden = final_hidden_state(q_model, batch)
        inputs.update(recorded)
        return hidden

    cache_call, unpatched_call = _calls([lambda: fp_activations(fp_model, batch, patches), unpatched_pass], pool)
    cache, unpatched = cache_call(), unpatched_call()

    def score(patch: Patch) -> tuple[torch.Tensor, torch.Tensor]:
        if patch.site == "none":
            assert unpatched is not None
            hidden, model = unpatched, q_model
        elif patch.site in WEIGHT_SITES:
            model = (hybrids or {})[patch.key]
            hidden = final_hidden_state(model, batch)
        else:
            model = q_model
            with patch_hooks.use(_patch_fns(patch, cache)):
                hidden = run_from(q_model, min(patch.layers), inputs) if fast else final_hidden_state(q_model, batch)
        return batch_nll(model, batch, hidden)

    calls = _calls([lambda patch=patch: score(patch) for patch in patches], pool)
    return {patch.key: call() for patch, call in zip(patches, calls, strict=True)}


_Result = TypeVar("_Result")


def _calls(fns: Sequence[Callable[[], _Result]], pool: Executor | None) -> list[Callable[[], _Result]]:
    """Getters of the results of `fns`: called in place without a pool, else started in the pool
    (in inference mode, which is per thread) and waited for by the getter."""
    if pool is None:
        return list(fns)

    def inference(fn: Callable[[], _Result]) -> _Result:
        with torch.inference_mode():
            return fn()

    return [pool.submit(inference, fn).result for fn in fns]


def patching_table(
    fp_model: torch.nn.Module, q_model: torch.nn.Module, examples: pa.Table, model_name: str, method: str,
    patches: Sequence[Patch], batch_size: int = 8, device: str = "cpu", fast: bool = True, streams: int | None = None,
) -> pa.Table:
    """Per example and patch: the quantized model's NLL with that patch (io.PATCHING_SCHEMA).

    With `streams` ≥ 2 (default: `passes.default_streams`) each batch's patches run on two streams.
    """
    hybrids = {  # copied before the patch hooks are attached to q_model
        p.key: with_fp_weights(q_model, fp_model, WEIGHT_SITES[p.site], p.layers)
        for p in patches
        if p.site in WEIGHT_SITES
    }
    streams = default_streams(q_model) if streams is None else streams
    patch_hooks = ThreadHooks()
    columns: dict[str, list[Any]] = {name: [] for name in ("example_id", "site", "layers", "first", "last", "nll", "n")}
    with contextlib.ExitStack() as stack:
        stack.enter_context(patch_hooks.attach(q_model, patch_keys(patches)))
        pool = stack.enter_context(stream_pool(2)) if streams >= 2 else None
        for batch in iter_batches(examples, batch_size, device):
            results = patched_nll(fp_model, q_model, batch, patches, fast, hybrids, patch_hooks, pool)
            _add_rows(columns, batch, patches, results)
    n = len(columns["example_id"])
    return pa.table(
        {
            "example_id": pa.array(columns["example_id"], pa.int32()),
            "model": [model_name] * n,
            "method": [method] * n,
            "site": columns["site"],
            "layers": columns["layers"],
            "first_layer": pa.array(columns["first"], pa.int32()),
            "last_layer": pa.array(columns["last"], pa.int32()),
            "nll": np.array(columns["nll"], dtype=np.float64),
            "n_scored": pa.array(columns["n"], pa.int32()),
        },
        schema=PATCHING_SCHEMA,
    )


def _add_rows(
    columns: dict[str, list[Any]], batch: Batch, patches: Sequence[Patch], results: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Append one batch's rows (per patch, its examples) to the table's columns."""
    ids = batch.example_ids.tolist()
    for patch in patches:
        sums, scored = results[patch.key]
        columns["example_id"] += ids
        columns["site"] += [patch.site] * len(ids)
        columns["layers"] += [patch.label] * len(ids)
        columns["first"] += [min(patch.layers) if patch.layers else None] * len(ids)
        columns["last"] += [max(patch.layers) if patch.layers else None] * len(ids)
        columns["nll"] += (sums / scored.clamp_min(1)).tolist()
        columns["n"] += scored.tolist()
