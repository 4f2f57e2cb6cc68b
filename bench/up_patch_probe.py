"""Why patching `up` alone wrecks a model: a gate and an up output from two different residual streams.

Patching FP's up_proj output into a quantized model (or the reverse) multiplies one stream's up
by the other stream's act(gate). This probe asks whether that is about quantization error or
about the mixing itself. In the FP model alone it replaces the residual entering the first probed
layer by the quantized model's (a perturbation), then runs the probed layers with one site frozen
at the clean FP run's values:

- `none`: the perturbed FP run itself;
- `up`, `gate`, `down` (the MLP output), `attn`: that site frozen at clean values.

Freezing `down` keeps each MLP output consistent (the clean stream's); freezing `up` or `gate`
mixes the streams inside the MLP. It also prints, per layer, how far each frozen MLP output is from
the consistent one on the perturbed stream (relative MSE, no compounding over layers), and the
quantized model with FP up_proj *weights* in the probed layers.

    .venv/bin/python bench/up_patch_probe.py --results results --method rtn-w3-g64 --set large
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from qbreak.hooks import decoder_layers, hooks
from qbreak.io import EXAMPLES_SCHEMA, SELECTION_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.nll import batch_nll
from qbreak.passes import Batch, final_hidden_state, iter_batches

FROZEN_SITES = ("none", "up", "gate", "down", "attn")


def _capture(model: torch.nn.Module, batch: Batch, keys: Iterable[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """The activations at `keys` ((layer, hook site)) of an unpatched forward."""
    got: dict[tuple[int, str], torch.Tensor] = {}
    with hooks(model, {key: (lambda x, key=key: got.__setitem__(key, x)) for key in keys}):
        final_hidden_state(model, batch)
    return got


def frozen_site_nll(
    fp: torch.nn.Module, other: torch.nn.Module, batch: Batch, layers: Sequence[int], sites: Sequence[str] = FROZEN_SITES
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """site → (summed NLL [batch], scored tokens [batch]) of the FP model whose residual entering
    `layers[0]` is `other`'s, with that site frozen at the clean FP run's values in `layers`."""
    first = layers[0]
    entering = _capture(other, batch, [(first, "block_in")])[(first, "block_in")]
    clean = _capture(fp, batch, [(layer, site) for layer in layers for site in sites if site != "none"])
    results = {}
    for site in sites:
        fns = {(first, "block_in"): lambda x: entering}
        if site != "none":
            fns |= {(layer, site): (lambda x, key=(layer, site): clean[key]) for layer in layers}
        with hooks(fp, fns):
            hidden = final_hidden_state(fp, batch)
        results[site] = batch_nll(fp, batch, hidden)
    return results


def local_mlp_error(
    fp: torch.nn.Module, other: torch.nn.Module, batch: Batch, layers: Sequence[int]
) -> dict[tuple[str, int], tuple[float, float]]:
    """(frozen factor, layer) → (squared error, squared norm) of the FP MLP output on the perturbed
    stream with `up`, `gate` or both taken from the clean stream, against the consistent MLP output."""
    first = layers[0]
    entering = _capture(other, batch, [(first, "block_in")])[(first, "block_in")]
    clean = _capture(fp, batch, [(layer, "post_norm") for layer in layers])
    perturbed: dict[tuple[int, str], torch.Tensor] = {}
    fns = {(first, "block_in"): lambda x: entering}
    fns |= {(layer, "post_norm"): (lambda x, key=(layer, "post_norm"): perturbed.__setitem__(key, x)) for layer in layers}
    with hooks(fp, fns):
        final_hidden_state(fp, batch)
    real = batch.attention_mask.bool()
    sums: dict[tuple[str, int], tuple[float, float]] = {}
    for layer in layers:
        mlp = decoder_layers(fp)[layer].mlp
        xc, xp = clean[(layer, "post_norm")][real], perturbed[(layer, "post_norm")][real]
        gate_c, gate_p = mlp.act_fn(mlp.gate_proj(xc)), mlp.act_fn(mlp.gate_proj(xp))
        up_c, up_p = mlp.up_proj(xc), mlp.up_proj(xp)
        consistent = mlp.down_proj(gate_p * up_p)
        for name, out in (("up", gate_p * up_c), ("gate", gate_c * up_p), ("both", gate_c * up_c)):
            sums[(name, layer)] = (float(((mlp.down_proj(out) - consistent) ** 2).sum()), float((consistent**2).sum()))
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="a finished run's results folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikipedia-vital")
    parser.add_argument("--method", default="rtn-w3-g64")
    parser.add_argument("--set", default="large", choices=["large", "ctrl", "all"], help="D_large, D_ctrl or every example")
    parser.add_argument("--layers", default=None, help="first-last (default: the upper half, as patching does)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.results)
    fp = load_model(root / "models" / args.model / "fp")
    quantized = load_model(root / "models" / args.model / args.method)
    n_layers = len(decoder_layers(fp))
    first, last = map(int, args.layers.split("-")) if args.layers else (n_layers // 2, n_layers - 1)
    layers = list(range(first, last + 1))
    examples = read_table(root / "corpus" / args.corpus / args.model / "examples.arrow", EXAMPLES_SCHEMA)
    if args.set != "all":
        selection = read_table(root / "analysis" / args.model / "selection.arrow", SELECTION_SCHEMA)
        ids = selection.filter(pc.equal(selection["set"], args.set))["example_id"]
        examples = examples.filter(pc.is_in(examples["example_id"], value_set=pa.array(ids.to_pylist(), ids.type)))

    totals: dict[str, list[float]] = {}
    errors: dict[tuple[str, int], list[float]] = {}

    def add(key: str, nll: tuple[torch.Tensor, torch.Tensor]) -> None:
        total = totals.setdefault(key, [0.0, 0.0])
        total[0] += float(nll[0].sum())
        total[1] += float(nll[1].sum())

    saved = [decoder_layers(quantized)[layer].mlp.up_proj.weight.detach().clone() for layer in layers]
    with torch.inference_mode():
        for batch in iter_batches(examples, args.batch_size):
            add("FP", batch_nll(fp, batch, final_hidden_state(fp, batch)))
            add(args.method, batch_nll(quantized, batch, final_hidden_state(quantized, batch)))
            for site, nll in frozen_site_nll(fp, quantized, batch, layers).items():
                add(f"perturbed FP, {site} frozen", nll)
            for key, (err, norm) in local_mlp_error(fp, quantized, batch, layers).items():
                acc = errors.setdefault(key, [0.0, 0.0])
                acc[0] += err
                acc[1] += norm
            for layer in layers:
                decoder_layers(quantized)[layer].mlp.up_proj.weight.copy_(decoder_layers(fp)[layer].mlp.up_proj.weight)
            add(f"{args.method}, FP up_proj weights", batch_nll(quantized, batch, final_hidden_state(quantized, batch)))
            for layer, weight in zip(layers, saved):
                decoder_layers(quantized)[layer].mlp.up_proj.weight.copy_(weight)

    span = f"{first}-{last}"
    print(f"{examples.num_rows} examples ({args.set}), layers {span}; perplexity")
    for key, (nll_sum, n) in totals.items():
        label = key.replace("perturbed FP", f"FP with {args.method}'s residual entering layer {first}")
        print(f"  {label:70s} {math.exp(nll_sum / n):10.2f}")
    print("relative MSE of the FP MLP output on the perturbed stream, factor(s) from the clean stream, per layer")
    for name in ("up", "gate", "both"):
        cells = " ".join(f"{errors[(name, layer)][0] / errors[(name, layer)][1]:.2f}" for layer in layers)
        print(f"  {name:5s} {cells}")


if __name__ == "__main__":
    main()
