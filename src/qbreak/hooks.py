"""Named hook points on Llama-style decoder layers (Llama, Qwen2, Mistral, SmolLM2).

A decoder layer computes

    r_attn  = x + attn(input_layernorm(x))               # site pre_norm  (= residual r^(l))
    h       = post_attention_layernorm(r_attn)           # site post_norm (= MLP input, gate_input)
    mlp(h)  = down(act(gate(h)) * up(h))                 # sites gate_proj, gate, up, down
    out     = r_attn + mlp(h)                            # site block_out

and `attn` is the attention output before its residual add. A hook function gets the activation
at its site ([batch, pos, d]) and may return a replacement (patching) or None (observing).
`hooks()` is a context manager: hooks are removed when it exits, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch

from qbreak.errors import QbreakError

HookFn = Callable[[torch.Tensor], torch.Tensor | None]

# site -> (submodule of the decoder layer, "input" or "output" of that module); "" is the layer.
SITES: dict[str, tuple[str, str]] = {
    "attn": ("self_attn", "output"),
    "pre_norm": ("post_attention_layernorm", "input"),
    "post_norm": ("post_attention_layernorm", "output"),
    "gate_input": ("mlp.gate_proj", "input"),
    "gate_proj": ("mlp.gate_proj", "output"),
    "gate": ("mlp.act_fn", "output"),
    "up": ("mlp.up_proj", "output"),
    "down": ("mlp.down_proj", "output"),
    "block_in": ("", "input"),
    "block_out": ("", "output"),
}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (model.model.layers for Llama-style models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise QbreakError(f"{type(model).__name__}: no decoder .layers; qbreak hooks support Llama-style decoders")
    return layers


# Sites that mean "the residual stream" / "the MLP input" only where post_attention_layernorm
# normalises the residual before the MLP (Llama-style). Layers with a norm around the MLP as well
# (Gemma 2/3: pre_feedforward_layernorm; OLMo 2: post_feedforward_layernorm) use
# post_attention_layernorm on the attention output instead, so these sites would be silently wrong.
RESIDUAL_NORM_SITES = frozenset({"pre_norm", "post_norm"})
MLP_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def site_module(layer: torch.nn.Module, site: str) -> tuple[torch.nn.Module, str]:
    """(module, 'input' | 'output') of a named site in one decoder layer."""
    if site not in SITES:
        raise QbreakError(f"unknown hook site '{site}': expected one of {sorted(SITES)}")
    if site in RESIDUAL_NORM_SITES and (norm := next((n for n in MLP_NORMS if hasattr(layer, n)), None)):
        raise QbreakError(
            f"{type(layer).__name__} has {norm}: its post_attention_layernorm normalises the attention "
            f"output, not the residual before the MLP, so hook site '{site}' (Llama-style layers) does not apply"
        )
    path, where = SITES[site]
    module = layer
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            raise QbreakError(f"{type(layer).__name__} has no module '{path}' for hook site '{site}'")
    return module, where


def _replace_first(value: Any, replacement: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (replacement, *value[1:])
    return replacement


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _output_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        replacement = fn(_first_tensor(output))
        return None if replacement is None else _replace_first(output, replacement)

    return hook


def _input_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            replacement = fn(args[0])
            return None if replacement is None else ((replacement, *args[1:]), kwargs)
        replacement = fn(kwargs["hidden_states"])
        return None if replacement is None else (args, {**kwargs, "hidden_states": replacement})

    return hook


@contextlib.contextmanager
def hooks(model: torch.nn.Module, fns: Mapping[tuple[int, str], HookFn]) -> Iterator[None]:
    """Register `fns[(layer, site)]` on `model` for the duration of the context."""
    layers = decoder_layers(model)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for (layer, site), fn in fns.items():
            if not 0 <= layer < len(layers):
                raise QbreakError(f"hook layer {layer} out of range: the model has {len(layers)} layers")
            module, where = site_module(layers[layer], site)
            if where == "output":
                handles.append(module.register_forward_hook(_output_hook(fn)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ThreadHooks:
    """Hooks registered once on a model, whose functions each thread sets for itself (`use`), so
    that threads may run differently hooked forwards of the same model at once (the patching
    streams). A site without a function in the running thread observes nothing."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._keys: set[tuple[int, str]] = set()

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, keys: Collection[tuple[int, str]]) -> Iterator[None]:
        """Register a dispatching hook at every (layer, site) of `keys` for the duration of the context."""
        with hooks(model, {key: self._dispatch(key) for key in keys}):
            self._keys.update(keys)
            try:
                yield
            finally:
                self._keys.difference_update(keys)

    def _dispatch(self, key: tuple[int, str]) -> HookFn:
        def fn(x: torch.Tensor) -> torch.Tensor | None:
            own = getattr(self._local, "fns", None)
            return None if own is None or key not in own else own[key](x)

        return fn

    @contextlib.contextmanager
    def use(self, fns: Mapping[tuple[int, str], HookFn]) -> Iterator[None]:
        """Run the calling thread's forwards with `fns` at their sites, which must be attached."""
        missing = set(fns) - self._keys
        if missing:
            raise ValueError(f"hook sites {sorted(missing)} are not attached")
        self._local.fns = fns
        try:
            yield
        finally:
            self._local.fns = None
