"""Quantize one configured method: FP folder + calibration split → dequantized model folder + quant.json."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbreak import __version__
from qbreak.errors import QbreakError
from qbreak.io import EXAMPLES_SCHEMA, atomic_path, read_table
from qbreak.models import load_model
from qbreak.provenance import package_version
from qbreak.quantize import METHODS, MethodConfig, check_method

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def calibration_tensor(path: str | Path, config: MethodConfig) -> torch.Tensor:
    """The first `calibration_samples` rows of calibration.arrow as [samples, seq_len] int64."""
    table = read_table(path, EXAMPLES_SCHEMA)
    if table.num_rows < config.calibration_samples:
        raise QbreakError(
            f"config key methods.{config.name}.calibration_samples: {config.calibration_samples} asked for, "
            f"but {path} holds {table.num_rows} (raise corpus.n_calibration)"
        )
    rows = table.column("input_ids").to_pylist()[: config.calibration_samples]
    return torch.tensor(rows, dtype=torch.int64)


def _versions() -> dict[str, str]:
    return {"qbreak": __version__, **{name: package_version(name) for name in LIBRARIES}}


def quantize_model(
    name: str, entry: Mapping[str, Any], fp_dir: str | Path, calibration: str | Path | None, output: str | Path,
    device: str = "cpu",
) -> dict[str, Any]:
    """Quantize the FP model with config entry methods.<name>; write the folder atomically; return quant.json."""
    config = MethodConfig.from_config(name, entry)
    if config.kind not in METHODS:
        raise QbreakError(f"config key methods.{name}.kind: unknown kind '{config.kind}', expected one of {sorted(METHODS)}")
    quantizer = METHODS[config.kind]()
    model = load_model(fp_dir, dtype=torch.float32, device=device)
    check_method(config, quantizer, model)
    if quantizer.needs_calibration and calibration is None:
        raise QbreakError(f"config key methods.{name}: {config.kind} needs calibration data, none was given")
    calib = calibration_tensor(calibration, config) if quantizer.needs_calibration else None
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    details = quantizer.quantize(model, calib.to(device) if calib is not None else None, config)
    seconds = time.perf_counter() - start
    record = {
        "method": name,
        "kind": config.kind,
        "family": quantizer.family,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "seed": config.seed,
        "options": dict(config.options),
        "calibration": None
        if calib is None
        else {
            "file": str(calibration),
            "samples": int(calib.shape[0]),
            "seq_len": int(calib.shape[1]),
            "sha256": hashlib.sha256(calib.numpy().astype(np.int32).tobytes()).hexdigest(),
        },
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": _versions(),
        **details,
    }
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (Path(fp_dir) / file).is_file():
                shutil.copyfile(Path(fp_dir) / file, tmp / file)
        (tmp / "quant.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("%s: %s %d-bit g%d in %.1f s", name, config.kind, config.bits, config.group_size, seconds)
    return record
