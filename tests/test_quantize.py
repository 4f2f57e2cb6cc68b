"""Quantizers: weights really on the grid, NF4 equals bitsandbytes, seeded, clear config errors."""

from __future__ import annotations

import pytest
import torch

from qbreak.errors import QbreakError
from qbreak.models import load_model
from qbreak.quantize import METHODS, MethodConfig, check_method, decoder_linears
from qbreak.quantize.nf import nf_quantize_tensor, normal_float_codebook
from qbreak.quantize.rtn import rtn_quantize_tensor
from tests.conftest import make_tiny_llama


def distinct_per_group(weight: torch.Tensor, group_size: int) -> int:
    groups = weight.reshape(weight.shape[0], -1, group_size).reshape(-1, group_size)
    return max(len(torch.unique(g)) for g in groups)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_is_on_a_grid_and_within_half_a_step(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(32, 256)
    deq = rtn_quantize_tensor(w, bits, 64, symmetric)
    assert distinct_per_group(deq, 64) <= 2**bits
    groups = w.reshape(32, 4, 64)
    span = groups.abs().amax(-1) * 2 if symmetric else groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)
    levels = 2**bits - 2 if symmetric else 2**bits - 1
    step = (span / levels)[..., None]
    assert ((deq.reshape(32, 4, 64) - groups).abs() <= step / 2 + 1e-6).all()


def test_rtn_error_shrinks_with_bits() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    errors = [(rtn_quantize_tensor(w, b, 64) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_nf4_codebook_and_dequantization_equal_bitsandbytes() -> None:
    import bitsandbytes.functional as bnb

    torch.testing.assert_close(normal_float_codebook(4), bnb.get_4bit_type("nf4", device="cpu"), atol=2e-7, rtol=0)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(nf_quantize_tensor(w, 4, 64), bnb.dequantize_4bit(packed, state), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_nf_groups_are_exactly_codebook_times_absmax(bits: int) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    deq = nf_quantize_tensor(w, bits, 64).reshape(16, 2, 64)
    absmax = w.reshape(16, 2, 64).abs().amax(-1, keepdim=True)
    codes = deq / absmax
    codebook = normal_float_codebook(bits)
    assert len(codebook) == 2**bits and codebook.min() == -1 and codebook.max() == 1 and (codebook == 0).any()
    distance = (codes[..., None] - codebook).abs().amin(-1)
    assert distance.max() < 1e-6
    # and each value is the *nearest* code
    nearest = codebook[(w.reshape(16, 2, 64) / absmax)[..., None].sub(codebook).abs().argmin(-1)]
    torch.testing.assert_close(codes, nearest, atol=1e-6, rtol=0)


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny Llama saved as a model folder with a word-level tokenizer (llm-compressor reads both)."""
    global TINY_DIR
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    TINY_DIR = tmp_path_factory.mktemp("tiny-tokenizer")
    vocab = {f"t{i}": i for i in range(512)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(TINY_DIR)
    make_tiny_llama().save_pretrained(TINY_DIR, safe_serialization=True)


TINY_DIR = None


def quantized_copy(kind: str, bits: int, group_size: int = 32, **options) -> tuple[torch.nn.Module, dict]:
    model = load_model(TINY_DIR)
    config = MethodConfig(name=f"{kind}{bits}", kind=kind, bits=bits, group_size=group_size,
                          calibration_samples=4, options=options)
    quantizer = METHODS[kind]()
    check_method(config, quantizer, model)
    calibration = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    info = quantizer.quantize(model, calibration if quantizer.needs_calibration else None, config)
    return model, info


FAST_METHODS = [("rtn", 3), ("rtn", 4), ("nf", 3), ("nf", 4), ("hqq", 3), ("hqq", 4)]
CALIBRATED_METHODS = [("gptq", 3), ("awq", 4)]


@pytest.mark.parametrize(("kind", "bits"), FAST_METHODS + CALIBRATED_METHODS)
def test_every_method_leaves_decoder_weights_on_a_grid(kind: str, bits: int) -> None:
    options = {"n_grid": 4} if kind == "awq" else {}
    model, info = quantized_copy(kind, bits, **options)
    reference = make_tiny_llama()
    assert info["layers_quantized"] == len(decoder_linears(model)) == 14
    for name, linear in decoder_linears(model).items():
        assert distinct_per_group(linear.weight, 32) <= 2**bits, name
        assert not torch.equal(linear.weight, decoder_linears(reference)[name].weight), name
    # embeddings and lm_head stay full precision
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.model.embed_tokens.weight, reference.model.embed_tokens.weight, atol=0, rtol=0)
    # the result is a plain model: no quantization hooks or extra parameters left behind
    assert set(model.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("actorder", ["weight", None])
def test_gptq_activation_orderings_the_schema_allows_stay_on_the_grid(actorder: str | None) -> None:
    model, _ = quantized_copy("gptq", 3, actorder=actorder)
    assert max(distinct_per_group(linear.weight, 32) for linear in decoder_linears(model).values()) <= 2**3


@pytest.mark.parametrize(("kind", "bits"), FAST_METHODS + CALIBRATED_METHODS)
def test_quantizing_twice_with_the_same_seed_is_bit_identical(kind: str, bits: int) -> None:
    options = {"n_grid": 4} if kind == "awq" else {}
    first, _ = quantized_copy(kind, bits, **options)
    second, _ = quantized_copy(kind, bits, **options)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_awq_carries_over_rescaled_norms() -> None:
    model, info = quantized_copy("awq", 3, n_grid=4)
    reference = make_tiny_llama()
    changed_norms = [
        name for name, p in model.named_parameters()
        if "norm" in name and not torch.equal(p, dict(reference.named_parameters())[name])
    ]
    assert changed_norms and info["tensors_changed"] > len(decoder_linears(model))


def test_unsupported_bits_and_bad_group_size_name_the_key() -> None:
    model = make_tiny_llama()
    with pytest.raises(QbreakError, match=r"methods.nf5.bits: nf supports \[2, 3, 4\] bits, got 5"):
        check_method(MethodConfig("nf5", "nf", 5, 32), METHODS["nf"](), model)
    with pytest.raises(QbreakError, match=r"methods.g48.group_size: 48 does not divide the input width 64 of layer model.layers.0"):
        check_method(MethodConfig("g48", "rtn", 4, 48), METHODS["rtn"](), model)


def test_unknown_kind_names_the_key(tmp_path) -> None:
    from qbreak.quantize.run import quantize_model

    with pytest.raises(QbreakError, match="methods.x.kind: unknown kind 'awk'"):
        quantize_model("x", {"kind": "awk", "bits": 4, "group_size": 64}, tmp_path, tmp_path / "c.arrow", tmp_path / "o")


def test_kind_modules_of_the_workflow_match_the_quantizers() -> None:
    """Each quantize job's code hash covers config.KIND_MODULES[kind] (torch-free): it must be the
    module that defines the kind's quantizer."""
    from qbreak.config import KIND_MODULES

    assert KIND_MODULES == {kind: quantizer.__module__.removeprefix("qbreak.") for kind, quantizer in METHODS.items()}


def test_calibrated_kinds_of_the_workflow_match_the_quantizers() -> None:
    """The Snakefile wires calibration inputs from config.CALIBRATED_KINDS (torch-free): it must agree."""
    from qbreak.config import CALIBRATED_KINDS

    assert CALIBRATED_KINDS == {kind for kind, quantizer in METHODS.items() if quantizer.needs_calibration}
