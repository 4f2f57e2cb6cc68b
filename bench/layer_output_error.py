"""Per-layer output error of quantized weights on the FP model's real activations, two methods side by side.

For every decoder Linear: ‖x·Ŵᵀ − x·Wᵀ‖ / ‖x·Wᵀ‖ with x the FP model's input to that layer on the
first evaluation examples, and the plain weight error ‖Ŵ − W‖ / ‖W‖. A method can have the smaller
weight error yet the larger output error where activation outlier dimensions meet its errors.

    .venv/bin/python bench/layer_output_error.py --methods hqq-w3-g64 rtn-w3-g64 --examples 4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.models import load_model
from qbreak.quantize import decoder_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="a finished default run's results folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs=2, default=["hqq-w3-g64", "rtn-w3-g64"])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.results)
    fp = load_model(root / "models" / args.model / "fp")
    weights = {m: load_file(root / "models" / args.model / m / "model.safetensors") for m in args.methods}
    examples = read_table(root / "corpus" / "wikipedia-vital" / args.model / "examples.arrow", EXAMPLES_SCHEMA)
    ids = torch.tensor(examples.column("input_ids").to_pylist()[: args.examples])
    linears = dict(decoder_linears(fp))
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0].reshape(-1, a[0].shape[-1])))
        for name, module in linears.items()
    ]
    with torch.inference_mode():
        fp(ids)
    for handle in handles:
        handle.remove()
    a, b = args.methods
    rows = []
    with torch.inference_mode():
        for name, module in linears.items():
            x, w = inputs[name], module.weight
            y = x @ w.T
            out = {m: ((x @ weights[m][f"{name}.weight"].T - y).norm() / y.norm()).item() for m in args.methods}
            rel = {m: ((weights[m][f"{name}.weight"] - w).norm() / w.norm()).item() for m in args.methods}
            rows.append((out[a] / out[b], name, out[a], out[b], rel[a], rel[b]))
    rows.sort(reverse=True)
    print(f"{len(rows)} layers, {args.examples} examples; output error {a} / {b}, largest first")
    for ratio, name, oa, ob, ra, rb in rows[: args.show]:
        print(f"{name:40s} output {oa:.3f} vs {ob:.3f} (×{ratio:.2f})   weight {ra:.3f} vs {rb:.3f}")
    print(f"median output-error ratio {statistics.median(r[0] for r in rows):.3f}; "
          f"{sum(r[0] > 1 for r in rows)} of {len(rows)} layers worse for {a}; "
          f"median weight error {statistics.median(r[4] for r in rows):.3f} vs {statistics.median(r[5] for r in rows):.3f}")


if __name__ == "__main__":
    main()
