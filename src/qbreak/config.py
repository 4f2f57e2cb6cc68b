"""Config checking with one-line messages that name the offending key.

The JSON schema (schemas/config.schema.yaml) is the single source of truth for keys, types and
defaults; this turns the first schema violation into `config key corpus.seq_len: 'long' is not of
type 'integer'` instead of a page of schema dump. Snakemake's own `validate` then fills in the
defaults. What a schema cannot express is checked here too: a key given twice in a config file
(`check_config_files`), settings that contradict each other (`check_references`), and layer
settings against a model's depth (`check_layer_settings`), and group sizes against its Linear
widths (`check_group_sizes`).

`python -m qbreak.config FILE...` checks config files on their own (`make run` calls it first:
Snakemake reports a YAML syntax error in a `--configfile` without naming the file).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from qbreak.errors import QbreakError
from qbreak.layers import check_layers, layer_range

# Method kinds that read calibration data (the quantizers' `needs_calibration`, kept here without torch
# so the Snakefile can wire inputs; a test checks the two agree).
CALIBRATED_KINDS = frozenset({"gptq", "awq"})
# The module of each method kind's quantizer (quantize.METHODS, kept here without torch so that each
# quantize job's code hash covers its own quantizer and not the others; a test checks they agree).
KIND_MODULES = {
    "rtn": "quantize.rtn",
    "nf": "quantize.nf",
    "hqq": "quantize.hqq",
    "gptq": "quantize.gptq",
    "awq": "quantize.awq",
}


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def load_schema(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML JSON schema."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# A corpus entry's optional source keys and their defaults (schemas/config.schema.yaml): two calibration
# entries that differ only by spelling a default out name the same corpus.
SOURCE_DEFAULTS: dict[str, Any] = {"subset": None, "split": "train", "text_column": "text", "max_documents": None}

# Keys of a methods.<name> entry: those every kind takes, and each kind's own (the schema lists their
# union; an option of another kind would be recorded in quant.json and silently ignored).
METHOD_KEYS = frozenset({"kind", "bits", "group_size", "seed"})
KIND_KEYS: dict[str, frozenset[str]] = {
    "gptq": frozenset({"symmetric", "calibration_samples", "calibration", "damping", "block_size", "actorder"}),
    "awq": frozenset({"symmetric", "calibration_samples", "calibration", "n_grid", "duo_scaling"}),
    "rtn": frozenset({"symmetric"}),
    "nf": frozenset(),
    "hqq": frozenset({"optimize"}),
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise QbreakError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: key '{key}' given twice in one mapping"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
    if twice is not None:
        raise QbreakError(f"key '{twice}' given twice in one object")
    return dict(pairs)


def check_config_files(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Raise QbreakError naming the file (and line) of a key given twice: Snakemake's loader keeps the
    last, so a duplicated method or a second `methods:` block would replace the first unnoticed.
    JSON files are read as JSON first, as Snakemake does (JSON indented with tabs is not YAML)."""
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise QbreakError(f"{path}: cannot read the config file ({reason})") from None
        try:
            json.loads(text, object_pairs_hook=_unique_pairs)
            continue
        except json.JSONDecodeError:
            pass  # YAML, below
        except QbreakError as error:
            raise QbreakError(f"{path}: {error}") from None
        kind = "JSON or YAML" if str(path).endswith(".json") else "YAML"
        try:
            yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.MarkedYAMLError as error:
            line = f"line {error.problem_mark.line + 1}: " if error.problem_mark else ""
            raise QbreakError(f"{path}: {line}not valid {kind} ({error.problem})") from None
        except yaml.YAMLError as error:  # e.g. a control character: a reader error, no mark; its
            # second line only locates it in "<unicode string>"
            reason = str(error).splitlines()[0].rstrip(":")
            raise QbreakError(f"{path}: not valid {kind} ({reason})") from None
        except QbreakError as error:
            raise QbreakError(str(error).replace("<unicode string>", str(path), 1)) from None


def check_config(config: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Raise QbreakError naming the config key of the first schema violation, then of the first
    cross-reference the schema cannot express (see `check_references`)."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if not errors:
        check_references(config)
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


def check_references(config: Mapping[str, Any]) -> None:
    """Raise QbreakError naming the key of the first setting that contradicts another: an option of
    another method kind, a patched or analysed method that is not configured, two calibration
    corpora of one name with different sources, a calibration corpus named like the main corpus."""
    methods: Mapping[str, Mapping[str, Any]] = config.get("methods") or {}
    for name, entry in methods.items():
        allowed = METHOD_KEYS | KIND_KEYS[entry["kind"]]
        for key in entry:
            if key not in allowed:
                raise QbreakError(
                    f"config key methods.{name}.{key}: not an option of kind {entry['kind']} "
                    f"(its options: {', '.join(sorted(allowed))})"
                )
    for section in ("patching", "analysis"):
        for method in (config.get(section) or {}).get("methods") or []:
            if method not in methods:
                raise QbreakError(
                    f"config key {section}.methods: '{method}' is not a configured method {sorted(methods)}"
                )
    corpus_name = (config.get("corpus") or {}).get("name")
    sources: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, entry in methods.items():
        calibration = entry.get("calibration")
        if not calibration:
            continue
        key = f"methods.{name}.calibration.name"
        if calibration["name"] == corpus_name:
            raise QbreakError(f"config key {key}: '{corpus_name}' is the main corpus's name; choose another")
        source = {k: v for k, v in calibration.items() if k != "name" and SOURCE_DEFAULTS.get(k, ...) != v}
        first = sources.setdefault(calibration["name"], (name, source))
        if first[1] != source:
            raise QbreakError(
                f"config key {key}: '{calibration['name']}' names another source in methods.{first[0]}.calibration; "
                "one name, one corpus"
            )


def check_layer_settings(config: Mapping[str, Any], model: str, n_layers: int) -> None:
    """Raise QbreakError naming the first layer setting outside model `model`'s `n_layers` decoder
    layers (residuals.lens_layers, patching.sweep_layers, residuals.restore_ranges, patching.ranges),
    by the rules the jobs apply when they load the model (`qbreak.layers`), but before the first job,
    where config.json is already here."""
    residuals, patching = config.get("residuals") or {}, config.get("patching") or {}
    try:
        check_layers(residuals.get("lens_layers") or [], n_layers, "residuals.lens_layers")
        check_layers(patching.get("sweep_layers") or [], n_layers, "patching.sweep_layers")
        for entry in residuals.get("restore_ranges") or []:
            layer_range(entry, n_layers, "residuals.restore_ranges")
        for entry in patching.get("ranges") or []:
            layer_range(entry, n_layers, "patching.ranges")
    except QbreakError as error:
        raise QbreakError(f"{error} (model {model})") from None


# Top-level mappings whose entries' order means something: the order of the runs' models and methods
# in every table and figure. Every other mapping's key order is only how the file was written.
ORDERED_MAPPINGS = frozenset({"models", "methods"})


def canonical_order(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every mapping's keys sorted, except the entries of `models` and `methods` (their
    order is the runs' order; each entry's own keys are sorted). The rules pass config sections as
    `params`, and Snakemake compares a rule's params as written, key order included: without this,
    rewriting a config file with its keys in another order (an editor, yaml.safe_dump) would rerun
    every job."""

    def sort(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: sort(value[key]) for key in sorted(value, key=str)}
        if isinstance(value, list):
            return [sort(item) for item in value]
        return value

    return {
        key: {name: sort(entry) for name, entry in config[key].items()}
        if key in ORDERED_MAPPINGS and isinstance(config[key], Mapping)
        else sort(config[key])
        for key in sorted(config, key=str)
    }


def check_group_size(method: str, group_size: int, width: int, where: str) -> None:
    """QbreakError unless `group_size` divides a Linear input `width` (`where`: which Linear); the one
    rule of the dry run's `check_group_sizes` and the quantize job's `quantize.check_method`."""
    if width % group_size:
        raise QbreakError(
            f"config key methods.{method}.group_size: {group_size} does not divide the input width {width} {where}"
        )


def check_group_sizes(config: Mapping[str, Any], model: str, widths: Mapping[str, int]) -> None:
    """Raise QbreakError naming the first method whose group size does not divide one of model
    `model`'s Linear input widths (`models.model_linear_widths`), before the first job, where
    config.json is already here; the quantize job checks every layer of the loaded model again."""
    for name, entry in (config.get("methods") or {}).items():
        group = entry.get("group_size")
        if isinstance(group, int) and group > 0:
            for source, width in widths.items():
                check_group_size(name, group, width, f"({source}) of model {model}")


def main(argv: Sequence[str] | None = None) -> int:
    """Check config files (`check_config_files`); print one `qbreak error:` line and return 1 on the first bad one."""
    paths = sys.argv[1:] if argv is None else argv
    try:
        if not paths:
            raise QbreakError("no config file given: python -m qbreak.config FILE...")
        check_config_files(paths)
    except QbreakError as error:
        print(f"qbreak error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
