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
from qbreak.errors import QbreakError, first_line

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


KL_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("kl_fp_q", pa.float64(), nullable=False),  # mean token KL(P_fp‖P_q), nats
        pa.field("kl_q_fp", pa.float64(), nullable=False),  # mean token KL(P_q‖P_fp), nats
        pa.field("kl_fp_q_topk", pa.float64(), nullable=False),  # top-k approximation of kl_fp_q (≤ it)
        pa.field("topk", pa.int32(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_scored", pa.int32(), nullable=False),
    ]
)

TOPK_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("topk", pa.int32(), nullable=False),
        pa.field("token_ids", pa.list_(pa.list_(pa.int32())), nullable=False),  # [n_scored][k]
        pa.field("logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),  # [n_scored][k], FP log-probs
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
    """Yield a temporary path beside `path`; on success fsync it (every file of a folder) and rename it
    onto `path`.

    Works for files and folders. On error the temporary path is removed and `path` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed mid-write (kill -9, node failure): one writer per output at a time
    # (Snakemake's lock), so any older temporary of this output is garbage.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        _remove(stale)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        for written in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
            with open(written, "rb") as f:
                os.fsync(f.fileno())
        if tmp.is_dir():
            _fsync_dir(tmp)
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
        try:
            cast = table.select(schema.names).cast(schema)
        except (pa.ArrowException, ValueError) as exc:
            raise QbreakError(f"{path}: {_cast_fault(table, schema) or first_line(exc)}") from None
        table = cast.replace_schema_metadata(table.schema.metadata)
    return table


def _cast_fault(table: pa.Table, schema: pa.Schema) -> str | None:
    """Which column keeps `table` from `schema`: nulls where none may be, or values of another type."""
    for field in schema:
        column = table[field.name]
        if not field.nullable and column.null_count:
            return f"column '{field.name}' has {column.null_count} null value(s), where none may be"
        try:
            column.cast(field.type)
        except (pa.ArrowException, ValueError) as exc:
            return f"column '{field.name}' is {column.type}, not {field.type} ({first_line(exc)})"
    return None


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

_CORRELATION_FIELDS = [
    pa.field("n", pa.int32(), nullable=False),  # examples
    pa.field("pearson", pa.float64()),
    pa.field("pearson_lo", pa.float64()),  # 95% percentile bootstrap interval
    pa.field("pearson_hi", pa.float64()),
    pa.field("spearman", pa.float64()),
    pa.field("spearman_lo", pa.float64()),
    pa.field("spearman_hi", pa.float64()),
]

CORRELATIONS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        # error: errors of two methods; kl_vs_error: a method's KL(P_fp‖P_q) vs its error;
        # kl_topk_vs_kl: its top-k KL vs its exact KL
        pa.field("measure", pa.string(), nullable=False),
        pa.field("method_a", pa.string(), nullable=False),
        pa.field("method_b", pa.string(), nullable=False),
        pa.field("family_a", pa.string(), nullable=False),
        pa.field("family_b", pa.string(), nullable=False),
        pa.field("bits_a", pa.int32(), nullable=False),
        pa.field("bits_b", pa.int32(), nullable=False),
        pa.field("same_family", pa.bool_(), nullable=False),
        *_CORRELATION_FIELDS,
    ]
)

OVERLAP_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method_a", pa.string(), nullable=False),
        pa.field("method_b", pa.string(), nullable=False),
        pa.field("same_family", pa.bool_(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),  # examples
        pa.field("k", pa.int32(), nullable=False),  # size of each top set
        pa.field("shared", pa.int32(), nullable=False),  # |top_a ∩ top_b|
        pa.field("jaccard", pa.float64(), nullable=False),
        pa.field("jaccard_random", pa.float64(), nullable=False),  # expectation for independent sets
    ]
)

CORRELATION_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # cross_family, same_family, kl_vs_error, ...
        pa.field("n_pairs", pa.int32(), nullable=False),
        pa.field("mean_pearson", pa.float64()),
        pa.field("min_pearson", pa.float64()),
        pa.field("max_pearson", pa.float64()),
        pa.field("mean_spearman", pa.float64()),
        pa.field("mean_jaccard", pa.float64()),  # top-set overlap of the same pairs
    ]
)

SELECTION_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        # large (D_large), ctrl (D_ctrl), duplicate (a top example dropped as a near-duplicate), other
        pa.field("set", pa.string(), nullable=False),
        pa.field("mean_error", pa.float64(), nullable=False),  # averaged over the selection's methods
        pa.field("rank", pa.int32(), nullable=False),  # 1 = largest mean error
        pa.field("duplicate_of", pa.int32()),  # the kept example a duplicate resembles
        pa.field("similarity", pa.float64()),  # its n-gram Jaccard similarity to that example
    ]
)

RESIDUALS_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),  # 0-based decoder layer
        pa.field("site", pa.string(), nullable=False),  # pre_norm, post_norm or block_out
        pa.field("norm", pa.float64(), nullable=False),  # mean over tokens of the L2 norm
        pa.field("kurtosis", pa.float64(), nullable=False),  # mean over tokens, over d_model entries
    ]
)

AMPLIFICATION_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        # mean over tokens of mean over d_model of (MLP_q(norm_q(r)) − MLP_fp(norm_fp(r)))², r = the FP
        # residual before the MLP's RMSNorm (post_attention_layernorm); norm_q = norm_fp but for AWQ
        pa.field("mlp_mse", pa.float64(), nullable=False),
        pa.field("mlp_power", pa.float64(), nullable=False),  # the same mean of MLP_fp(norm_fp(r))²
    ]
)

DIMS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),  # residual dimension
        pa.field("mean_abs", pa.float64(), nullable=False),  # mean |r^(l)| over the FP pass's tokens
        pa.field("gamma", pa.float64(), nullable=False),  # post_attention_layernorm weight of that dim
    ]
)

NORM_CORR_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # a method, or 'mean' (error averaged over methods)
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("site", pa.string(), nullable=False),  # pre_norm or post_norm (FP magnitudes)
        *_CORRELATION_FIELDS,
    ]
)

AMPLIFICATION_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("mean_mlp_mse", pa.float64(), nullable=False),
        pa.field("relative_mse", pa.float64(), nullable=False),  # Σ mse / Σ FP MLP output power
        *_CORRELATION_FIELDS,  # of the per-example MSE with the FP post-norm magnitude
    ]
)

GAMMA_OUTLIERS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("outlier", pa.int32(), nullable=False),  # 1 = the largest mean |activation|
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("mean_abs", pa.float64(), nullable=False),
        pa.field("ratio_to_median", pa.float64(), nullable=False),  # mean |a| over the median dim's
        pa.field("gamma", pa.float64(), nullable=False),  # |γ| of post_attention_layernorm
        pa.field("gamma_rank", pa.float64(), nullable=False),  # 1 = the smallest |γ| of the layer
        pa.field("gamma_percentile", pa.float64(), nullable=False),
        pa.field("n_dims", pa.int32(), nullable=False),
    ]
)

PREDICTOR_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # a method (its top errors) or 'mean' (D_large)
        pa.field("predictor", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("n_positive", pa.int32(), nullable=False),
        pa.field("auroc", pa.float64()),
    ]
)

LENS_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),  # the decoded layer's output
        pa.field("nll", pa.float64(), nullable=False),  # mean NLL of softmax(U · final_norm(r_layer))
    ]
)

RESTORE_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("restored", pa.string(), nullable=False),  # label of the restored range, "first-last"
        pa.field("first_layer", pa.int32()),  # null when nothing is restored
        pa.field("last_layer", pa.int32()),
        pa.field("nll", pa.float64(), nullable=False),
        pa.field("n_scored", pa.int32(), nullable=False),
    ]
)

LENS_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # fp or a quantized method
        pa.field("set", pa.string(), nullable=False),  # large (D_large) or ctrl (D_ctrl)
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),  # examples
        pa.field("mean_nll", pa.float64(), nullable=False),  # mean of the per-example logit-lens NLLs
        pa.field("perplexity", pa.float64(), nullable=False),  # exp(mean_nll)
    ]
)

RESTORE_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("set", pa.string(), nullable=False),
        # 'none (fp)' = the FP model, 'none (quantized)' = fully quantized, else the restored range
        pa.field("restored", pa.string(), nullable=False),
        pa.field("first_layer", pa.int32()),
        pa.field("last_layer", pa.int32()),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("mean_nll", pa.float64(), nullable=False),  # token-weighted
        pa.field("perplexity", pa.float64(), nullable=False),
    ]
)

PATCHING_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        # none, attn, gate, up, down, gate_input, resid, or a *_weights restore (FP weights, not activations)
        pa.field("site", pa.string(), nullable=False),
        pa.field("layers", pa.string(), nullable=False),  # label: "first-last" or one layer
        pa.field("first_layer", pa.int32()),
        pa.field("last_layer", pa.int32()),
        pa.field("nll", pa.float64(), nullable=False),
        pa.field("n_scored", pa.int32(), nullable=False),
    ]
)

PATCH_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("set", pa.string(), nullable=False),  # large (D_large) or ctrl (D_ctrl)
        pa.field("site", pa.string(), nullable=False),  # fp, none (= quantized), a patch site, *_weights
        pa.field("layers", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("perplexity", pa.float64(), nullable=False),  # token-weighted over the set
        pa.field("recovered", pa.float64()),  # share of the FP–quantized perplexity gap closed
    ]
)
