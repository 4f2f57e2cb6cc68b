"""Per-example negative log-likelihood, without materializing full-vocabulary log-probabilities.

The NLL of an example is the mean over its tokens of −log p(token | prefix), excluding the first
position (it has no prediction; in qbreak it holds the start token). Log-sum-exp and the target
logit are computed over chunks of positions and, within a chunk, online over blocks of the
vocabulary, so no more than one cache-sized block of logits exists at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from qbreak.columns import Columns
from qbreak.io import NLL_SCHEMA
from qbreak.passes import Batch, iter_batches, run_pass

DEFAULT_CHUNK_TOKENS = 1024
# Rows of the lm_head per block of the online log-sum-exp: [chunk, block] float32 logits (8 MB at
# 1,024 × 2,048) fit in L3. The head's matmul + log-sum-exp ran at 90% of the 2048² matmul peak with
# 2,048-row blocks vs 86.5% with 4,096 (bench/head_blocks.py: 1,016 positions × 576 × 49,152, best of 12).
DEFAULT_VOCAB_BLOCK = 2048
# On a GPU: 4,096 positions × 16,384 vocabulary rows (a 256 MB float32 block). With the CPU's sizes,
# each block's matmul is too small to fill the GPU and each block waits on the host (the target
# gather's and the top-k merge's index lookups): on an H200 at Llama-3-8B's shape (bf16, 64 × 512
# tokens) the NLL pass ran at 44.1% MFU with the CPU's sizes against 61.2% with these, and the
# FP + quantized pass at 32.5% against 58.7%; the whole vocabulary as one block gained 0.3 and 1.2
# points for 2.5 and 6.6 GiB more memory (bench/gpu_passes.py, 2026-12-04). Both heads, NLL and KL,
# use the same sizes (`head_sizes`).
GPU_CHUNK_TOKENS = 4096
GPU_VOCAB_BLOCK = 16384
# Config attributes that change logits after lm_head; models with them take the plain-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_sizes(
    device: str | torch.device, chunk_tokens: int | None = None, vocab_block: int | None = None
) -> tuple[int, int]:
    """(positions per chunk, vocabulary rows per block) of the online heads on `device`: the given
    values, or the device's defaults (cache-sized blocks on a CPU, large ones on a GPU)."""
    if torch.device(device).type == "cpu":
        return chunk_tokens or DEFAULT_CHUNK_TOKENS, vocab_block or DEFAULT_VOCAB_BLOCK
    return chunk_tokens or GPU_CHUNK_TOKENS, vocab_block or GPU_VOCAB_BLOCK


def chunk_slices(n: int, chunk_tokens: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk_tokens` positions covering range(n)."""
    for start in range(0, n, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, n))


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    vocab_block: int | None = None,
) -> torch.Tensor:
    """−log softmax(hidden · weightᵀ + bias)[target] per position, float32 [n].

    hidden [n, d_model], weight [vocab, d_model], targets [n] int64. The log-sum-exp runs online
    over blocks of `vocab_block` rows of the head (each block's log-sum-exp folded into a running one), so a block of
    logits [chunk, vocab_block] stays in cache: the full [chunk, vocab] logits of one chunk are
    never written to memory and read back (on a 2-core CPU that traffic cost a quarter of the head;
    bench/nll_throughput.py). Without `chunk_tokens` / `vocab_block`, the device's `head_sizes`.
    """
    chunk_tokens, vocab_block = head_sizes(hidden.device, chunk_tokens, vocab_block)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    buffer = block_buffer(min(chunk_tokens, hidden.shape[0]), weight.shape[0], vocab_block, hidden.device)
    for part in chunk_slices(hidden.shape[0], chunk_tokens):
        lse, target_logit = _online_logsumexp(hidden[part], weight, bias, targets[part], vocab_block, buffer)
        out[part] = lse - target_logit
    return out


def head_logits_block(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: slice, out: torch.Tensor
) -> torch.Tensor:
    """float32 logits of one vocabulary block, written into `out` [n, block] (and returned).

    Reusing one `out` buffer for every block (and every chunk) matters on CPU: a fresh
    multi-megabyte tensor per block is a fresh mapping whose pages fault in on first write.
    """
    w = weight[block]
    b = None if bias is None else bias[block]
    if states.dtype != out.dtype or w.dtype != out.dtype:  # low precision: compute in it, store float32
        return out.copy_(torch.nn.functional.linear(states, w, b))
    if b is None:
        return torch.mm(states, w.t(), out=out)
    return torch.addmm(b, states, w.t(), out=out)


def block_buffer(n: int, vocab: int, vocab_block: int, device: torch.device) -> torch.Tensor:
    """Flat float32 storage for [n, min(vocab_block, vocab)] logits (see `block_view`)."""
    return torch.empty(n * min(vocab_block, vocab), dtype=torch.float32, device=device)


def block_view(buffer: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """A contiguous [n, width] view of the front of a `block_buffer`."""
    return buffer[: n * width].view(n, width)


def softmax_(logits: torch.Tensor, peak: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Overwrite `logits` [n, m] (or write `out`) with their row-wise softmax; return the rows'
    log-sum-exp, float64 [n].

    `peak` is the rows' maximum if the caller has it. torch's softmax is one fused kernel that
    takes a row's max, exp and sum while the row is in cache; the separate amax, subtract, exp and
    sum passes it replaces took 1.4x its time on [508, 2,048] blocks (one thread, 2026-12-04). A
    row's largest probability is e⁰ / Σ e^(z − max), so log-sum-exp = max − log(largest probability),
    one cheap pass more. For the online KL, which weighs each block's logit differences with it.
    """
    peak = logits.amax(dim=-1) if peak is None else peak
    out = logits if out is None else out
    torch.softmax(logits, dim=-1, out=out)
    return peak.double() - out.amax(dim=-1).double().log()


def logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp of `logits` [n, m] (float32 [n]), overwriting them with exp(logits − row max).

    Separate passes, not `softmax_`: the NLL needs no normalized block, and on [1,016, 2,048]
    blocks the fused softmax's extra scaling pass made the NLL head 0.95x (one thread, 2026-12-04).
    """
    peak = logits.amax(dim=-1)
    total = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
    return total.log_().add_(peak)


def gather_block_targets(logits: torch.Tensor, targets: torch.Tensor, block: slice, out: torch.Tensor) -> None:
    """Write into `out` [n] the logit of every target that falls in the vocabulary block."""
    inside = (targets >= block.start) & (targets < block.stop)
    rows = inside.nonzero().squeeze(1)
    out[rows] = logits[rows, targets[rows] - block.start]


def _online_logsumexp(
    states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    vocab_block: int,
    buffer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of the logits, target logit), both float32 [n], one vocabulary block at a time.

    Every block's logits land in `buffer` (a `block_buffer` for at least n rows); its log-sum-exp
    is taken in place and merged into the running one with logaddexp.
    """
    n, vocab = states.shape[0], weight.shape[0]
    lse = torch.full((n,), -torch.inf, dtype=torch.float32, device=states.device)
    target_logit = torch.empty(n, dtype=torch.float32, device=states.device)
    for block in chunk_slices(vocab, vocab_block):
        logits = head_logits_block(states, weight, bias, block, out=block_view(buffer, n, block.stop - block.start))
        gather_block_targets(logits, targets, block, target_logit)
        lse = torch.logaddexp(lse, logsumexp_(logits))
    return lse, target_logit


def has_plain_lm_head(model: torch.nn.Module) -> bool:
    """True when logits are exactly lm_head(final hidden state), so the chunked path applies."""
    head = model.get_output_embeddings()
    config = model.config
    return isinstance(head, torch.nn.Linear) and not any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS
    )


@dataclass(frozen=True)
class ScoredPositions:
    """The predicting positions of a right-padded batch, flattened over examples."""

    mask: torch.Tensor  # [batch, pos-1] bool: position p predicts token p+1
    targets: torch.Tensor  # [n] int64
    rows: torch.Tensor  # [n] int64, the example (batch row) of each position

    @classmethod
    def of(cls, batch: Batch) -> ScoredPositions:
        mask = batch.attention_mask[:, 1:].bool()
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        return cls(mask=mask, targets=batch.input_ids[:, 1:][mask], rows=rows)

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states [n, d_model] of the scored positions, from hidden [batch, pos, d_model]."""
        return hidden[:, :-1][self.mask]

    def per_example_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-position `values` [n] for each example, float64 [batch]."""
        sums = torch.zeros(self.mask.shape[0], dtype=torch.float64, device=values.device)
        return sums.index_add_(0, self.rows, values.double())


def logit_chunks(
    model: torch.nn.Module,
    batch: Batch,
    hidden: torch.Tensor,
    positions: ScoredPositions,
    chunk_tokens: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice into the n scored positions, float32 logits [chunk, vocab]) chunk by chunk.

    With a plain lm_head only one chunk of logits exists at a time; otherwise the model's own
    logits are computed once for the batch (the fallback for transformed logits).
    """
    chunk_tokens, _ = head_sizes(hidden.device, chunk_tokens)
    if has_plain_lm_head(model):
        head = model.get_output_embeddings()
        states = positions.states(hidden)  # [n, d_model]
        for part in chunk_slices(states.shape[0], chunk_tokens):
            yield part, torch.nn.functional.linear(states[part], head.weight, head.bias).float()
        return
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    scored = positions.states(logits)  # [n, vocab]
    for part in chunk_slices(scored.shape[0], chunk_tokens):
        yield part, scored[part].float()


def batch_nll(
    model: torch.nn.Module,
    batch: Batch,
    hidden: torch.Tensor,
    chunk_tokens: int | None = None,
    vocab_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64 [batch]) and number of scored tokens ([batch]) of each example."""
    positions = ScoredPositions.of(batch)
    if has_plain_lm_head(model):
        head = model.get_output_embeddings()
        states, targets = positions.states(hidden), positions.targets
        nll = token_nll(states, head.weight, targets, head.bias, chunk_tokens, vocab_block)
        return positions.per_example_sum(nll), positions.mask.sum(dim=1)
    nll = torch.empty(positions.targets.shape[0], dtype=torch.float32, device=hidden.device)
    for part, logits in logit_chunks(model, batch, hidden, positions, chunk_tokens):
        target_logit = logits.gather(1, positions.targets[part, None]).squeeze(1)
        nll[part] = torch.logsumexp(logits, dim=-1) - target_logit
    return positions.per_example_sum(nll), positions.mask.sum(dim=1)


class NLLStatistic:
    """Per-example mean NLL; one row per example (see io.NLL_SCHEMA)."""

    def __init__(
        self, model_name: str, method: str, chunk_tokens: int | None = None, vocab_block: int | None = None
    ) -> None:
        self.model_name = model_name
        self.method = method
        self.chunk_tokens, self.vocab_block = chunk_tokens, vocab_block
        self._rows = Columns(example_id=np.int32, sum=np.float64, n_scored=np.int32, n_tokens=np.int32)

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        self.add(batch, self.reduce(model, batch, hidden))

    def reduce(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL and scored tokens of each example of the batch (touches no state)."""
        return batch_nll(model, batch, hidden, self.chunk_tokens, self.vocab_block)

    def add(self, batch: Batch, partial: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Append one batch's `reduce` result (batches in table order)."""
        sums, scored = partial
        self._rows.append(len(sums), {
            "example_id": batch.example_ids.cpu().numpy(), "sum": sums.cpu().numpy(),
            "n_scored": scored.cpu().numpy(), "n_tokens": batch.lengths.cpu().numpy(),
        })

    def result(self) -> pa.Table:
        n, scored = len(self._rows), self._rows["n_scored"]
        return pa.table(
            {
                "example_id": self._rows["example_id"],
                "model": [self.model_name] * n,
                "method": [self.method] * n,
                "nll": self._rows["sum"] / np.maximum(scored, 1),
                "n_tokens": self._rows["n_tokens"],
                "n_scored": scored,
            },
            schema=NLL_SCHEMA,
        )


def per_example_nll(
    model: torch.nn.Module,
    examples: pa.Table,
    model_name: str,
    method: str,
    batch_size: int = 8,
    device: str = "cpu",
    chunk_tokens: int | None = None,
    streams: int | None = None,
) -> pa.Table:
    """Per-example mean NLL of `model` on `examples` (an examples.arrow table); `streams` as in run_pass."""
    statistic = NLLStatistic(model_name, method, chunk_tokens)
    run_pass(model, iter_batches(examples, batch_size, device), [statistic], streams)
    return statistic.result()
