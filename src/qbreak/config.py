"""Config checking with one-line messages that name the offending key.

The JSON schema (schemas/config.schema.yaml) is the single source of truth; this turns the first
schema violation into `config key corpus.seq_len: 'long' is not of type 'integer'` instead of a
page of schema dump. Snakemake's own `validate` then fills in the defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

from qbreak.errors import QbreakError

# Method kinds that read calibration data (the quantizers' `needs_calibration`, kept here without torch
# so the Snakefile can wire inputs; a test checks the two agree).
CALIBRATED_KINDS = frozenset({"gptq", "awq"})


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def load_schema(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML JSON schema."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def check_config(config: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Raise QbreakError naming the config key of the first schema violation."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if not errors:
        return
    error = errors[0]
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        prefix = f"{where}." if error.absolute_path else ""
        raise QbreakError(
            f"config key {prefix}{extra[0]}: unknown key (allowed here: {', '.join(sorted(allowed))})"
        )
    if error.validator == "oneOf":
        options = [sorted(o.get("required", [])) for o in error.schema["oneOf"]]
        raise QbreakError(f"config key {where}: give exactly one source, one of {options}")
    raise QbreakError(f"config key {where}: {error.message}")
