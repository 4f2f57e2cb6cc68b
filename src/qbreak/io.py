"""Arrow IPC tables: the schemas of every result qbreak writes, and crash-safe writing.

Every table carries the qbreak version in its schema metadata. Files are written to a temporary
path in the same folder, fsync'ed and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from qbreak import __version__
from qbreak.errors import QbreakError

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("topic", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),  # length of input_ids
        pa.field("text", pa.string(), nullable=False),  # decoded document tokens, start token excluded
    ]
)

NLL_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("nll", pa.float64(), nullable=False),  # mean NLL (nats) over the scored tokens
        pa.field("n_tokens", pa.int32(), nullable=False),  # tokens in the example
        pa.field("n_scored", pa.int32(), nullable=False),  # predicted tokens = n_tokens - 1
    ]
)


def _metadata(extra: Mapping[str, str] | None) -> dict[bytes, bytes]:
    meta = {"qbreak_version": __version__, **(extra or {})}
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    Works for files and folders. On error the temporary path is removed and `path` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _remove(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_table(
    table: pa.Table,
    path: str | os.PathLike[str],
    schema: pa.Schema | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `table` as an Arrow IPC file, cast to `schema` when given, atomically."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    table = table.replace_schema_metadata(_metadata(metadata))
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def read_table(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pa.Table:
    """Read an Arrow IPC file; a missing, corrupt or wrongly shaped file is a one-line error."""
    try:
        with pa.memory_map(str(path), "r") as source:
            table = ipc.open_file(source).read_all()
    except FileNotFoundError:
        raise QbreakError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise QbreakError(f"{path}: not a readable Arrow IPC file ({exc})") from None
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names]
        if missing:
            raise QbreakError(f"{path}: missing columns {missing}")
        table = table.select(schema.names).cast(schema).replace_schema_metadata(table.schema.metadata)
    return table


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The schema metadata of `table` as str -> str."""
    raw = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("bits", pa.int32(), nullable=False),
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("nll_fp", pa.float64(), nullable=False),
        pa.field("nll_q", pa.float64(), nullable=False),
        pa.field("error", pa.float64(), nullable=False),  # nll_q - nll_fp, nats per token
    ]
)
