"""Job entry points called by the workflow scripts: file I/O at the edges, one call per rule.

Each function takes plain values (paths, config mappings), so it runs the same from Snakemake,
from a test or from a notebook. `run_job` turns a QbreakError into one line on stderr and exit 1.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qbreak.errors import QbreakError
from qbreak.io import ERRORS_SCHEMA, EXAMPLES_SCHEMA, NLL_SCHEMA, read_table, write_table
from qbreak.runtime import configure

log = logging.getLogger(__name__)


def run_job(job: Callable[..., None], threads: int, **kwargs: Any) -> None:
    """Configure threads, run `job(**kwargs)`; a QbreakError becomes one line and exit status 1."""
    configure(threads)
    start = time.perf_counter()
    try:
        job(**kwargs)
    except QbreakError as exc:
        message = f"qbreak error: {exc}"
        print(message, file=sys.stderr)
        if sys.stderr is not sys.__stderr__:
            print(message, file=sys.__stderr__)
        raise SystemExit(1) from None
    log.info("%s finished in %.1f s", job.__name__, time.perf_counter() - start)


def fetch_model_job(name: str, spec: Mapping[str, Any], output: str) -> None:
    """Materialize config entry models.<name> at `output` (a Hugging Face folder)."""
    from qbreak.models import fetch_model

    fetch_model(name, spec, output)


def _tokenize_corpus(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str
) -> tuple[pa.Table, pa.Table, dict[str, str]]:
    """(evaluation, calibration, metadata) of a corpus entry, tokenized with the model's tokenizer."""
    from qbreak.corpus import build_examples, iter_documents, resolve_start_token
    from qbreak.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir, bool(model_spec.get("trust_remote_code", False)))
    start_id = resolve_start_token(tokenizer, model_spec.get("start_token", "bos"), f"{model_key}.start_token")
    evaluation, calibration = build_examples(
        iter_documents(corpus),
        tokenizer,
        seq_len=int(corpus["seq_len"]),
        n_examples=int(corpus["n_examples"]),
        n_calibration=int(corpus["n_calibration"]),
        seed=int(corpus["seed"]),
        start_token_id=start_id,
        corpus_name=str(corpus["name"]),
    )
    meta = {
        "corpus": str(corpus["name"]),
        "seq_len": str(corpus["seq_len"]),
        "seed": str(corpus["seed"]),
        "start_token_id": str(start_id),
    }
    return evaluation, calibration, meta


def make_examples_job(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str,
    examples: str, calibration: str,
) -> None:
    """Tokenize the corpus with the model's tokenizer and write the evaluation and calibration splits."""
    evaluation, calib, meta = _tokenize_corpus(corpus, model_spec, model_key, model_dir)
    write_table(evaluation, examples, EXAMPLES_SCHEMA, {**meta, "split": "evaluation"})
    write_table(calib, calibration, EXAMPLES_SCHEMA, {**meta, "split": "calibration"})


def make_calibration_job(
    corpus: Mapping[str, Any], model_spec: Mapping[str, Any], model_key: str, model_dir: str, calibration: str
) -> None:
    """Tokenize a method's own calibration corpus (n_examples = 0) and write its calibration split."""
    _, calib, meta = _tokenize_corpus(corpus, model_spec, model_key, model_dir)
    write_table(calib, calibration, EXAMPLES_SCHEMA, {**meta, "split": "calibration"})


def nll_job(
    model_name: str, method: str, model_dir: str, examples: str, output: str, runtime: Mapping[str, Any],
    trust_remote_code: bool = False,
) -> None:
    """Per-example NLL of one model folder on examples.arrow, written to `output`."""
    from qbreak.models import load_model
    from qbreak.nll import per_example_nll
    from qbreak.runtime import torch_dtype

    device = str(runtime.get("device", "cpu"))
    dtype = torch_dtype(str(runtime.get("dtype", "float32")), device)
    table = read_table(examples, EXAMPLES_SCHEMA)
    model = load_model(Path(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    result = per_example_nll(model, table, model_name, method, int(runtime.get("batch_size", 8)), device)
    seconds = time.perf_counter() - start
    n_tokens = int(sum(result.column("n_tokens").to_pylist()))
    log.info("%s/%s: %d examples, %.0f tokens/s", model_name, method, result.num_rows, n_tokens / seconds)
    write_table(result, output, NLL_SCHEMA, {"model": model_name, "method": method, "dtype": str(dtype)})


def quantize_job(
    method: str, entry: Mapping[str, Any], model_dir: str, calibration: str, output: str, device: str = "cpu"
) -> None:
    """Quantize the FP model with config entry methods.<method> into `output`."""
    from qbreak.quantize.run import quantize_model

    quantize_model(method, entry, model_dir, calibration, output, device=device)


def errors_job(fp: str, nll: Mapping[str, str], methods: Mapping[str, Mapping[str, Any]], output: str) -> None:
    """Join the FP NLL with every method's NLL into results/errors/{model}.arrow."""
    from qbreak.errors_table import error_table
    from qbreak.quantize import METHODS

    described = {
        name: {**entry, "family": METHODS[entry["kind"]].family} for name, entry in methods.items() if name in nll
    }
    quantized = {name: read_table(path, NLL_SCHEMA) for name, path in nll.items()}
    table = error_table(read_table(fp, NLL_SCHEMA), quantized, described)
    write_table(table, output, ERRORS_SCHEMA)
    for name in quantized:
        errors = table.filter(pc.equal(table["method"], name))
        log.info("%s: mean error %.4f nats", name, pc.mean(errors["error"]).as_py())
