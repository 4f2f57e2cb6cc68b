"""Model fetch: bundled GGUF → safetensors, local folders, the Hugging Face cache; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qbreak.errors import QbreakError
from qbreak.models import BUNDLED_MODELS, PROVENANCE_FILE, fetch_model, load_model, model_linear_widths
from qbreak.quantize.base import decoder_linears
from tests.conftest import make_tiny_llama


def save_tiny(folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """The tiny Llama as a Hugging Face folder, with `tokenizer_dir`'s tokenizer or a word-level one
    of its 512-token vocabulary."""
    make_tiny_llama().save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.glob("tokenizer*"):
            (folder / f.name).write_bytes(f.read_bytes())
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.slow
def test_bundled_model_is_a_plain_safetensors_llama(bundled_model_dir: Path, bundled_model: torch.nn.Module) -> None:
    config = json.loads((bundled_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # would make from_pretrained and llm-compressor refuse it
    assert (bundled_model_dir / "model.safetensors").is_file()
    assert not list(bundled_model_dir.glob("*.bin"))
    assert json.loads((bundled_model_dir / PROVENANCE_FILE).read_text())["source"] == "bundled"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert BUNDLED_MODELS["smollm2-135m"]["layers"] == config["num_hidden_layers"]  # the dry run's layer check
    # the dry run's group-size check: the bundled entry's widths are the real model's Linear input widths
    widths = BUNDLED_MODELS["smollm2-135m"]["linear_widths"]
    assert widths == model_linear_widths({"path": str(bundled_model_dir)})
    assert set(widths.values()) == {linear.in_features for linear in decoder_linears(bundled_model).values()}
    n_params = sum(p.numel() for p in bundled_model.parameters())  # tied lm_head counted once
    assert 134e6 < n_params < 135e6


@pytest.mark.slow
def test_bundled_model_matches_the_gguf_it_came_from(bundled_model: torch.nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    from qbreak.models import BUNDLED_MODELS, locate_package_folder

    entry = BUNDLED_MODELS["smollm2-135m"]
    folder = locate_package_folder(entry["package"], entry["distribution"])
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=entry["gguf_file"], dtype=torch.float32).eval()
    x = torch.tensor([[0, 504, 3458, 2366, 314, 260, 1789, 282]])
    with torch.inference_mode():
        torch.testing.assert_close(bundled_model(input_ids=x).logits, gguf(input_ids=x).logits, atol=1e-5, rtol=0)


def test_path_source_links_and_loads(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"pickle")  # never linked, never loaded
    out = fetch_model("tiny", {"path": str(src)}, tmp_path / "out")
    assert (out / "model.safetensors").is_symlink()
    assert not (out / "pytorch_model.bin").exists()
    assert json.loads((out / PROVENANCE_FILE).read_text())["source"] == "path"
    model = load_model(out)
    reference = make_tiny_llama()
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight)


def test_missing_local_model_path_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(QbreakError) as info:
        fetch_model("mymodel", {"path": str(missing)}, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and "models.mymodel.path" in message and str(missing) in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_model_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(QbreakError, match=r"no \*\.safetensors weights .*pytorch_model\.bin"):
        fetch_model("pickled", {"path": str(folder)}, tmp_path / "out")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), "config.json is not valid JSON (line 1: "),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json holds a JSON list, not an object"),
        (lambda f: _truncate(f / "model.safetensors", 4096), "model.safetensors is truncated: its tensors need "),
        (lambda f: _truncate(f / "model.safetensors", 5), "model.safetensors is not a safetensors file (truncated or no header)"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json here..."),
         "model.safetensors is not a safetensors file (its header is not JSON)"),
        (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer (none of tokenizer.json, *.model, vocab.json"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x06" + b"\0" * 7 + b"[1, 2]"),
         "model.safetensors is not a safetensors file (its header is not a JSON object)"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x21" + b"\0" * 7 + b'{"w": {"data_offsets": ["0", 4]}}'),
         "model.safetensors is not a safetensors file (a tensor without integer data_offsets)"),
        (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00002.safetensors"}}'),
         "model.safetensors.index.json names shards that are missing: ['model-00002.safetensors']"),
    ],
)
def test_a_broken_model_folder_is_refused_at_fetch_naming_the_file(tmp_path: Path, damage, message: str) -> None:  # noqa: ANN001
    """A corrupt config.json or safetensors file, a folder without tokenizer or with a missing shard:
    fetch_model stops with one line naming the key and the file, instead of a later job's traceback."""
    folder = save_tiny(tmp_path / "src")
    damage(folder)
    with pytest.raises(QbreakError) as info:
        fetch_model("broken", {"path": str(folder)}, tmp_path / "out")
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"config key models.broken.path: {folder}") and message in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_model_layers_without_loading_the_model(tmp_path: Path) -> None:
    from qbreak.models import model_layers

    assert model_layers({"path": str(save_tiny(tmp_path / "src"))}) == make_tiny_llama().config.num_hidden_layers
    assert model_layers({"bundled": "smollm2-135m"}) == 30  # SmolLM2-135M's config
    assert model_layers({"path": str(tmp_path / "missing")}) is None  # fetch_model reports that


def test_model_linear_widths_are_the_decoder_linears_input_widths(tmp_path: Path) -> None:
    model = make_tiny_llama()
    widths = model_linear_widths({"path": str(save_tiny(tmp_path / "src"))})
    assert widths is not None and set(widths) == {"hidden_size", "intermediate_size", "num_attention_heads × head_dim"}
    assert set(widths.values()) == {linear.in_features for linear in decoder_linears(model).values()}
    assert model_linear_widths({"path": str(tmp_path / "missing")}) is None


def test_model_entry_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(QbreakError, match="models.both: name exactly one source"):
        fetch_model("both", {"path": "x", "bundled": "smollm2-135m"}, tmp_path / "out")


def test_hf_source_reads_a_prefilled_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real snapshot_download call, against a hub cache laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    out = fetch_model("tiny", {"hf": "acme/tiny-llama", "revision": commit}, tmp_path / "out")
    info = json.loads((out / PROVENANCE_FILE).read_text())
    assert info["source"] == "hf" and info["revision"] == commit
    torch.testing.assert_close(load_model(out).lm_head.weight, make_tiny_llama().lm_head.weight)

    with pytest.raises(QbreakError, match="models.other.hf: acme/other@main is not in the Hugging Face cache"):
        fetch_model("other", {"hf": "acme/other", "revision": "main"}, tmp_path / "out2")


def test_parameter_count_from_config_matches_the_model(tmp_path: Path) -> None:
    """Job memory is sized from config.json alone; the count must be the model's own."""
    from qbreak.models import model_parameters, parameter_count

    model = make_tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    assert parameter_count(model.config.to_dict()) == n
    tied = model.config.to_dict() | {"tie_word_embeddings": True}  # the tiny model is untied, SmolLM2 tied
    assert parameter_count(tied) == n - model.config.vocab_size * model.config.hidden_size
    model.save_pretrained(tmp_path)
    assert model_parameters({"path": str(tmp_path)}) == n
    assert model_parameters({"path": str(tmp_path), "parameters": 7}) == 7
    assert model_parameters({"path": str(tmp_path / "absent")}) is None
