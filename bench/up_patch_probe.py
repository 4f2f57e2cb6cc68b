"""Why patching `up` alone wrecks a model: reproduced in the FP model, with no quantized weights after the perturbation.

Patching FP's up_proj output into a quantized model (or the reverse) multiplies one residual
stream's up by the other stream's act(gate). This probe asks whether the damage needs quantized
weights at all. In the FP model alone it replaces the residual entering the first probed layer by
the quantized model's (a perturbation), then runs the probed layers with one site frozen at the
clean FP run's values:

- `none`: the perturbed FP run itself;
- `up`, `gate`: one MLP factor frozen (clean up × perturbed act(gate), or the other way round);
- `down` (the MLP output) and `attn`: a whole sub-block's output frozen.

For each it prints the perplexity and, per probed layer, how far that run's residual stream (the
layer's output, positions after the first) has moved from the clean FP run's (relative L2
distance), and the quantized model with FP up_proj *weights* in the probed layers (not for AWQ,
whose folded scales put up_proj in another basis; `patching.RESCALED_SITES`).

Last, a first-order account of the asymmetry: at each probed layer of the perturbed run, the FP
MLP's response to the perturbation of its input, linearised at the clean run's input, splits into
a gate path, down(act′(g)·(W_gate δx) ⊙ up), and an up path, down(act(g) ⊙ W_up δx). Freezing `up`
keeps only the gate path, freezing `gate` only the up path. Each path's projection on the residual
error it is added to, δr (the layer's `pre_norm` residual, perturbed − clean), is printed as
⟨v, δr⟩ / ‖δr‖² (negative: it opposes the error), with its cosine and ‖v‖ / ‖δr‖.

    .venv/bin/python bench/up_patch_probe.py --results results --method rtn-w3-g64 --set large
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from qbreak.hooks import decoder_layers, hooks
from qbreak.io import EXAMPLES_SCHEMA, SELECTION_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.nll import batch_nll
from qbreak.passes import Batch, final_hidden_state, iter_batches
from qbreak.patching import RESCALING_KINDS, with_fp_weights

FROZEN_SITES = ("none", "up", "gate", "down", "attn")


def _entering(other: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """`other`'s residual entering `layer` [batch, pos, d_model]."""
    got: dict[str, torch.Tensor] = {}
    with hooks(other, {(layer, "block_in"): lambda x: got.__setitem__("x", x)}):
        final_hidden_state(other, batch)
    return got["x"]


def _after_first(batch: Batch) -> torch.Tensor:
    """[batch, pos] mask of the real tokens after the first (which carries the massive activations)."""
    scored = batch.attention_mask.bool().clone()
    scored[:, 0] = False
    return scored


@torch.inference_mode()
def frozen_site_runs(
    fp: torch.nn.Module, other: torch.nn.Module, batch: Batch, layers: Sequence[int], sites: Sequence[str] = FROZEN_SITES
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """site → (summed NLL [batch], scored tokens [batch], drift [len(layers)]) of the FP model whose
    residual entering `layers[0]` is `other`'s, with that site frozen at the clean FP run's values in
    `layers`. drift[i] = ‖r − r_clean‖ / ‖r_clean‖ of layer `layers[i]`'s output over the batch's real
    tokens after the first."""
    first = layers[0]
    entering = _entering(other, batch, first)
    keys = [(layer, site) for layer in layers for site in [*sites, "block_out"] if site != "none"]
    clean: dict[tuple[int, str], torch.Tensor] = {}
    with hooks(fp, {key: (lambda x, key=key: clean.__setitem__(key, x)) for key in keys}):
        final_hidden_state(fp, batch)
    scored = _after_first(batch)
    results = {}
    for site in sites:
        outputs: dict[int, torch.Tensor] = {}
        fns = {(first, "block_in"): lambda x: entering}
        if site != "none":
            fns |= {(layer, site): (lambda x, key=(layer, site): clean[key]) for layer in layers}
        fns |= {(layer, "block_out"): (lambda x, layer=layer: outputs.__setitem__(layer, x)) for layer in layers}
        with hooks(fp, fns):
            hidden = final_hidden_state(fp, batch)
        drift = torch.stack([
            (outputs[layer] - clean[(layer, "block_out")])[scored].norm() / clean[(layer, "block_out")][scored].norm()
            for layer in layers
        ])
        results[site] = (*batch_nll(fp, batch, hidden), drift)
    return results


def mlp_paths(mlp: torch.nn.Module, x: torch.Tensor, dx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gate path and the up path [tokens, d_model] of a gated MLP's first-order response to its
    input moving from x to x + dx ([tokens, d_model]); their sum is the MLP's directional derivative.
    The projections must be bias-free (Llama-style), so that a projection of dx is its change."""
    if any(getattr(mlp, name).bias is not None for name in ("gate_proj", "up_proj")):
        raise ValueError("mlp_paths needs bias-free gate_proj and up_proj")
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # [tokens, d_mlp]
    activated, gate_change = torch.func.jvp(mlp.act_fn, (gate,), (mlp.gate_proj(dx),))
    return {"gate": mlp.down_proj(gate_change * up), "up": mlp.down_proj(activated * mlp.up_proj(dx))}


@torch.inference_mode()
def linear_mlp_response(
    fp: torch.nn.Module, other: torch.nn.Module, batch: Batch, layers: Sequence[int]
) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(path, layer) → (⟨v, δr⟩, ‖δr‖², ‖v‖²) summed over the real tokens after the first, for the
    gate path and the up path v of the FP MLP's linearised response (module docstring) in the run
    whose residual entering `layers[0]` is `other`'s."""
    first = layers[0]
    entering = _entering(other, batch, first)
    runs: list[dict[tuple[int, str], torch.Tensor]] = []
    for perturbed in (False, True):
        got: dict[tuple[int, str], torch.Tensor] = {}
        fns = {
            (layer, site): (lambda x, key=(layer, site): got.__setitem__(key, x))
            for layer in layers
            for site in ("pre_norm", "post_norm")
        }
        if perturbed:
            fns[(first, "block_in")] = lambda x: entering
        with hooks(fp, fns):
            final_hidden_state(fp, batch)
        runs.append(got)
    clean, moved = runs
    scored = _after_first(batch)
    sums = {}
    for layer in layers:
        mlp = decoder_layers(fp)[layer].mlp
        x = clean[(layer, "post_norm")][scored]  # [tokens, d_model]
        dx = moved[(layer, "post_norm")][scored] - x
        dr = moved[(layer, "pre_norm")][scored] - clean[(layer, "pre_norm")][scored]
        for path, v in mlp_paths(mlp, x, dx).items():
            sums[(path, layer)] = (float((v * dr).sum()), float((dr * dr).sum()), float((v * v).sum()))
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

    kind = json.loads((root / "models" / args.model / args.method / "quant.json").read_text())["kind"]
    hybrid = None if kind in RESCALING_KINDS else with_fp_weights(quantized, fp, "mlp.up_proj", layers)

    totals: dict[str, list[float]] = {}
    drift: dict[str, list[torch.Tensor]] = {}
    response: dict[tuple[str, int], list[float]] = {}

    def add(key: str, nll: Sequence[torch.Tensor]) -> None:
        total = totals.setdefault(key, [0.0, 0.0])
        total[0] += float(nll[0].sum())
        total[1] += float(nll[1].sum())

    with torch.inference_mode():
        for batch in iter_batches(examples, args.batch_size):
            add("FP", batch_nll(fp, batch, final_hidden_state(fp, batch)))
            add(args.method, batch_nll(quantized, batch, final_hidden_state(quantized, batch)))
            for site, run in frozen_site_runs(fp, quantized, batch, layers).items():
                add(f"perturbed FP, {site} frozen", run)
                drift.setdefault(site, []).append(run[2])
            for key, values in linear_mlp_response(fp, quantized, batch, layers).items():
                response[key] = [a + b for a, b in zip(response.get(key, [0.0, 0.0, 0.0]), values, strict=True)]
            if hybrid is not None:
                add(f"{args.method}, FP up_proj weights in {first}-{last}", batch_nll(hybrid, batch, final_hidden_state(hybrid, batch)))

    print(f"{examples.num_rows} examples ({args.set}), layers {first}-{last}; perplexity")
    for key, (nll_sum, n) in totals.items():
        label = key.replace("perturbed FP", f"FP with {args.method}'s residual entering layer {first}")
        print(f"  {label:70s} {math.exp(nll_sum / n):10.2f}")
    print(f"drift from the clean FP run per layer {first}-{last} (mean over batches of ‖r − r_clean‖ / ‖r_clean‖)")
    for site, values in drift.items():
        print(f"  {site:5s} " + " ".join(f"{value:.2f}" for value in torch.stack(values).mean(dim=0).tolist()))

    print(f"the FP MLP's linearised response to the perturbation, per layer {first}-{last}")
    for path in ("gate", "up"):
        sums = [response[(path, layer)] for layer in layers]
        print(f"  {path:4s} path ⟨v, δr⟩ / ‖δr‖²  " + " ".join(f"{vr / rr:+.2f}" for vr, rr, _ in sums))
        print(f"  {path:4s} path cosine          " + " ".join(f"{vr / (rr * vv) ** 0.5:+.2f}" for vr, rr, vv in sums))
        print(f"  {path:4s} path ‖v‖ / ‖δr‖      " + " ".join(f"{(vv / rr) ** 0.5:.2f}" for _, rr, vv in sums))


if __name__ == "__main__":
    main()
