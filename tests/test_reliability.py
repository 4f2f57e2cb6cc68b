"""Reliability: a killed job leaves nothing half-written and reruns; bad input is one clear line;
no unpickling and no remote code unless asked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from qbreak.errors import QbreakError
from qbreak.io import atomic_path
from tests.conftest import REPO, SNAKEMAKE, config_error, make_tiny_llama, run_snakemake, tiny_workflow_config


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "model"
    (tmp_path / ".model.tmp-99999").mkdir()  # a folder writer killed mid-write
    (tmp_path / ".model.tmp-99999" / "model.safetensors").write_bytes(b"half")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "model.safetensors").read_bytes() == b"whole"


@pytest.mark.slow
def test_killed_quantize_job_leaves_no_partial_model_and_reruns(
    bundled_model_dir: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """kill -9 the whole snakemake process tree while the quantized model is being written."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_workflow_config(bundled_model_dir)))
    target = "results/models/smollm2-135m/rtn-w3-g64"
    folder = tmp_path / "results" / "models" / "smollm2-135m"
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(folder.glob(".rtn-w3-g64.tmp-*")):  # the job is inside its atomic write
            assert proc.poll() is None, "snakemake ended before the quantize job started writing"
            assert time.monotonic() < deadline, "the quantize job never started writing"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / target).exists()  # nothing half-written under the real name

    refused = run_snakemake(tmp_path, "--cores", "2", target, check=False)  # the killed run's lock is left
    assert refused.returncode != 0 and "cannot be locked" in refused.stdout + refused.stderr
    run_snakemake(tmp_path, "--unlock")
    run_snakemake(tmp_path, "--cores", "2", target)
    assert sorted(p.name for p in folder.iterdir()) == ["fp", "rtn-w3-g64"]  # the leftover is gone
    reference = tiny_run / target / "model.safetensors"
    assert (tmp_path / target / "model.safetensors").read_bytes() == reference.read_bytes()  # deterministic


def tiny_gpt2():  # noqa: ANN201
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)).eval()


def test_architecture_without_decoder_layers_is_one_line_error() -> None:
    from qbreak.hooks import decoder_layers

    with pytest.raises(QbreakError) as info:
        decoder_layers(tiny_gpt2())
    assert str(info.value) == "GPT2LMHeadModel: no decoder .layers; qbreak hooks support Llama-style decoders"


def test_residual_sites_refuse_layers_that_normalise_the_attention_output() -> None:
    """Gemma 2's post_attention_layernorm normalises the attention output (pre_feedforward_layernorm
    feeds the MLP): pre_norm / post_norm would silently be other activations than Llama's."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from qbreak.hooks import hooks

    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=16,
    )).eval()
    for site in ("pre_norm", "post_norm"):
        with pytest.raises(QbreakError) as info, hooks(model, {(0, site): lambda x: None}):
            pass
        assert str(info.value) == (
            "Gemma2DecoderLayer has pre_feedforward_layernorm: its post_attention_layernorm normalises the "
            f"attention output, not the residual before the MLP, so hook site '{site}' (Llama-style layers) "
            "does not apply"
        )
    seen = []
    with torch.no_grad(), hooks(model, {(0, "down"): seen.append, (1, "block_out"): seen.append}):
        model(torch.zeros(1, 4, dtype=torch.long))
    assert len(seen) == 2  # sites that mean the same on these layers still work


def test_missing_hook_site_names_the_module() -> None:
    import torch

    from qbreak.hooks import hooks

    model = make_tiny_llama()
    model.model.layers[0].mlp.gate_proj = None  # an MLP without a gate, as in GPT-style blocks
    with pytest.raises(QbreakError, match=r"LlamaDecoderLayer has no module 'mlp\.gate_proj' for hook site 'gate_input'"):
        with hooks(model, {(0, "gate_input"): lambda x: None}):
            model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["methods"]["rtn-w3-g64"].update(kind="awk"), "methods.rtn-w3-g64.kind"),
        (lambda c: c["methods"]["rtn-w3-g64"].update(bits=9), "methods.rtn-w3-g64.bits"),
        (lambda c: c["corpus"].update(n_examples=0), "corpus.n_examples"),
        (lambda c: c["patching"].update(methods=["nope"]), "patching.methods"),
    ],
)
def test_bad_config_stops_the_workflow_before_any_job(
    bundled_model_dir: Path, tmp_path: Path, edit, message: str  # noqa: ANN001
) -> None:
    config = tiny_workflow_config(bundled_model_dir)
    edit(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, "--cores", "1", check=False)
    assert config_error(proc).startswith(f"config key {message}")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_method_settings_the_model_cannot_take_fail_their_job_with_one_line(
    bundled_model_dir: Path, tmp_path: Path
) -> None:
    """Bits a method does not support are only known with the quantizer: the quantize job stops with
    one line, and writes nothing. (A group size that does not divide a layer's width stops the dry
    run where config.json is here, test_config_and_io; the job's own check is in test_quantize.)"""
    config = tiny_workflow_config(bundled_model_dir)
    cases = {
        "bits": ("nf4-g64", {"bits": 5}, "methods.nf4-g64.bits: nf supports [2, 3, 4] bits, got 5"),
    }
    for name, (method, change, message) in cases.items():
        edited = yaml.safe_load(yaml.safe_dump(config))
        edited["methods"][method].update(change)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(edited))
        target = f"results/models/smollm2-135m/{method}"
        proc = run_snakemake(tmp_path, "--cores", "2", target, configfile=f"{name}.yaml", check=False)
        assert proc.returncode != 0
        assert [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(f"qbreak error: config key {message}")]
        assert not list((tmp_path / "results" / "models" / "smollm2-135m").glob(f"*{method}*"))


def test_no_unpickling_and_no_remote_code_by_default() -> None:
    """torch.load only with weights_only=True, no pickle, trust_remote_code only from the config."""
    sources = [*sorted((REPO / "src").rglob("*.py")), *sorted((REPO / "workflow_scripts").glob("*.py")),
               *sorted((REPO / "bench").glob("*.py")), *sorted((REPO / "rules").glob("*.smk"))]
    assert len(sources) > 30
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        assert "trust_remote_code=True" not in text, path
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    model_props = schema["properties"]["models"]["additionalProperties"]["properties"]
    assert model_props["trust_remote_code"]["default"] is False
