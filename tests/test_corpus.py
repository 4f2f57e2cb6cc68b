"""Examples: first seq_len tokens of long-enough documents, seeded, disjoint calibration split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qbreak.corpus import Document, build_examples, iter_documents, resolve_start_token
from qbreak.errors import QbreakError

pytestmark = pytest.mark.slow  # needs the bundled tokenizer (fetched once per session)


def docs(n: int, words: int = 60) -> list[Document]:
    return [Document(str(i), " ".join(f"word{i}x{j}" for j in range(words)), "t") for i in range(n)]


def test_bundled_wikipedia_corpus_is_real() -> None:
    documents = list(iter_documents({"bundled": "wikipedia-vital"}))
    assert len(documents) == 10_033
    assert len({d.doc_id for d in documents}) == len(documents)
    assert sum(len(d.text) for d in documents) > 4_000_000
    assert {d.topic for d in documents} >= {"Arts", "History"}


def test_examples_are_seq_len_with_start_token_and_disjoint(bundled_tokenizer) -> None:
    start = resolve_start_token(bundled_tokenizer, "<|endoftext|>", "models.m.start_token")
    assert start == 0
    evaluation, calibration = build_examples(
        iter_documents({"bundled": "wikipedia-vital"}), bundled_tokenizer, 64, 40, 10, seed=7, start_token_id=start
    )
    assert (evaluation.num_rows, calibration.num_rows) == (40, 10)
    for table in (evaluation, calibration):
        ids = table.column("input_ids").to_pylist()
        assert all(len(r) == 64 and r[0] == 0 and 0 not in r[1:] for r in ids)
        assert table.column("example_id").to_pylist() == list(range(table.num_rows))
    assert not set(evaluation.column("doc_id").to_pylist()) & set(calibration.column("doc_id").to_pylist())
    # The text column is the decoded document tokens, which tokenize back to the same ids.
    first = evaluation.slice(0, 1).to_pylist()[0]
    assert bundled_tokenizer(first["text"], add_special_tokens=False)["input_ids"] == first["input_ids"][1:]


def test_calibration_only_corpus(bundled_tokenizer) -> None:
    evaluation, calibration = build_examples(iter(docs(8)), bundled_tokenizer, 16, 0, 5, seed=0, start_token_id=0)
    assert evaluation.num_rows == 0 and evaluation.schema.equals(calibration.schema)
    assert calibration.num_rows == 5 and all(calibration.column("text").to_pylist())


def test_examples_are_seeded(bundled_tokenizer) -> None:
    def draw(seed: int) -> pa.Table:
        return build_examples(iter(docs(50)), bundled_tokenizer, 16, 10, 5, seed=seed, start_token_id=0)[0]

    assert draw(3).equals(draw(3))
    assert draw(3).column("doc_id").to_pylist() != draw(4).column("doc_id").to_pylist()


def test_short_documents_are_skipped_not_packed(bundled_tokenizer) -> None:
    corpus = docs(6, words=60) + docs(6, words=2)
    evaluation, calibration = build_examples(iter(corpus), bundled_tokenizer, 32, 4, 2, seed=0, start_token_id=None)
    kept = set(evaluation.column("doc_id").to_pylist()) | set(calibration.column("doc_id").to_pylist())
    assert len(kept) == 6 and all(len(r) == 32 for r in evaluation.column("input_ids").to_pylist())


def test_too_few_long_documents_is_one_line_error(bundled_tokenizer) -> None:
    with pytest.raises(QbreakError) as info:
        build_examples(iter(docs(5)), bundled_tokenizer, 32, 10, 2, seed=0, start_token_id=0, corpus_name="tiny")
    message = str(info.value)
    assert "\n" not in message and "corpus.n_examples" in message and "'tiny' has only 5 of 5" in message


def test_empty_corpus_is_an_error(bundled_tokenizer) -> None:
    with pytest.raises(QbreakError, match="has no documents"):
        build_examples(iter([]), bundled_tokenizer, 32, 1, 0, seed=0, start_token_id=0)


def test_start_token_choices(bundled_tokenizer) -> None:
    assert resolve_start_token(bundled_tokenizer, None, "k") is None
    assert resolve_start_token(bundled_tokenizer, "bos", "k") == bundled_tokenizer.bos_token_id
    with pytest.raises(QbreakError, match="models.m.start_token: '<nope>' is not a token"):
        resolve_start_token(bundled_tokenizer, "<nope>", "models.m.start_token")


def test_local_file_formats_give_the_same_documents(tmp_path: Path) -> None:
    texts = ["first document text", "second one", "third"]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    for name, column in (("c.txt", "text"), ("c.jsonl", "body"), ("c.parquet", "body")):
        got = [d.text for d in iter_documents({"path": str(tmp_path / name), "text_column": column})]
        assert got == texts, name
    with pytest.raises(QbreakError, match="corpus.path: .*missing.txt does not exist"):
        list(iter_documents({"path": str(tmp_path / "missing.txt")}))
    with pytest.raises(QbreakError, match="no column 'text'"):
        list(iter_documents({"path": str(tmp_path / "c.parquet")}))


def test_a_json_file_may_hold_one_array_of_objects(tmp_path: Path) -> None:
    rows = [{"text": "first document text", "id": "a"}, {"text": "second one"}]
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps(rows), encoding="utf-8")
    for name in ("c.json", "lines.json", "bom.json"):
        got = [(d.doc_id, d.text) for d in iter_documents({"path": str(tmp_path / name)})]
        assert got == [("a", "first document text"), ("1", "second one")], name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", '{"text": "ok"}\n{text: "no quotes"}\n', "c.jsonl: line 2 is not valid JSON (Expecting property name"),
        ("c.json", '[{"text": "ok"},\n {"text": }]', "c.json: not valid JSON (line 2: Expecting value)"),
        ("c.jsonl", '{"text": "ok"}\n["a list"]\n', "c.jsonl: line 2 is a JSON list, not an object (corpus.path)"),
        ("c.jsonl", '{"text": "ok"}\n{"text": null}\n', "c.jsonl: line 2: column 'text' is null, not text (corpus.text_column)"),
        ("c.json", '[{"text": 3}]', "c.json: item 0: column 'text' is int, not text (corpus.text_column)"),
        ("c.txt", b"caf\xe9 au lait\n", "config key corpus.path: {path} is not UTF-8 text (byte 3: invalid continuation byte)"),
        ("c.parquet", b"PAR1 truncated", "config key corpus.path: {path} is not a readable Parquet file ("),
    ],
)
def test_an_unreadable_corpus_file_is_one_line_naming_it(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(QbreakError) as info:
        list(iter_documents({"path": str(path)}))
    text = str(info.value)
    assert "\n" not in text and message.format(path=path) in text and str(path) in text


def test_null_text_in_parquet_names_the_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "c.parquet")
    with pytest.raises(QbreakError, match=r"c.parquet: row 1: column 'text' is null"):
        list(iter_documents({"path": str(tmp_path / "c.parquet")}))


def test_a_calibration_corpus_names_its_own_keys(tmp_path: Path, bundled_tokenizer) -> None:
    """A method's own calibration corpus (methods.<name>.calibration) names that method's keys."""
    with pytest.raises(QbreakError, match=r"^config key methods.gptq.calibration.path: .*c.csv does not exist"):
        list(iter_documents({"path": str(tmp_path / "c.csv")}, "methods.gptq.calibration"))
    (tmp_path / "c.csv").write_text("x")  # exists, wrong suffix
    with pytest.raises(QbreakError, match=r"^config key methods.gptq.calibration.path: .*c.csv must be"):
        list(iter_documents({"path": str(tmp_path / "c.csv")}, "methods.gptq.calibration"))
    with pytest.raises(QbreakError, match=r"^config key methods.gptq.calibration_samples: corpus 'cal' has only 5"):
        build_examples(iter(docs(5)), bundled_tokenizer, 32, 0, 8, seed=0, start_token_id=0, corpus_name="cal",
                       size_key="methods.gptq.calibration_samples", source_key="methods.gptq.calibration")
    with pytest.raises(QbreakError, match=r"^config key methods.gptq.calibration: corpus 'cal' has no documents"):
        build_examples(iter([]), bundled_tokenizer, 32, 0, 8, seed=0, start_token_id=0, corpus_name="cal",
                       size_key="methods.gptq.calibration_samples", source_key="methods.gptq.calibration")


def test_hf_dataset_source_streams_a_local_dataset(tmp_path: Path) -> None:
    """The real datasets.load_dataset(streaming=True) path, on a local dataset folder (no hub here)."""
    folder = tmp_path / "fineweb-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) for i in range(7)))
    spec = {"hf": str(folder), "revision": "main", "split": "train", "max_documents": 5}
    got = list(iter_documents(spec))
    assert [d.doc_id for d in got] == ["d0", "d1", "d2", "d3", "d4"]
    with pytest.raises(QbreakError, match="corpus.revision"):
        list(iter_documents({"hf": str(folder)}))
