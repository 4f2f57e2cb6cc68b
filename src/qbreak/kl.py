"""Per-example KL divergence between the FP and a quantized model's next-token distributions.

Both models run side by side on each batch (`passes.run_pair_pass`); the two distributions exist
one chunk of positions at a time, never for the corpus. The same pass yields the quantized model's
NLL, so a method costs one FP and one quantized forward in all.

Besides the exact KL in both directions, the pass computes the top-k approximation that an FP
reference of k log-probs per token allows (`fp_topk_reference`, `TopkReference`):

    KL_k(P‖Q) = Σ_{i∈top-k(P)} p_i (log p_i − log q_i) + r_P log(r_P / r_Q),

with r the probability mass outside P's top k. By the log-sum inequality KL_k ≤ KL (the tail is
merged into one outcome); it is exact when the tail carries no mass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from qbreak.columns import Columns
from qbreak.errors import QbreakError
from qbreak.io import KL_SCHEMA, NLL_SCHEMA, TOPK_SCHEMA
from qbreak.nll import (
    ScoredPositions,
    block_buffer,
    block_view,
    chunk_slices,
    gather_block_targets,
    has_plain_lm_head,
    head_logits_block,
    head_sizes,
    logit_chunks,
    softmax_,
)
from qbreak.passes import Batch, ModelState, iter_batches, run_pair_pass, run_pass

DEFAULT_TOPK = 32


@torch.inference_mode()
def topk_kl(top_logp_p: torch.Tensor, logp_q_at_top: torch.Tensor) -> torch.Tensor:
    """KL_k(P‖Q) per position, float64 [n], from P's top-k log-probs [n, k] and Q's at those tokens."""
    lp, lq = top_logp_p.double(), logp_q_at_top.double()
    head = (lp.exp() * (lp - lq)).sum(dim=-1)
    # 1 − Σ of k float32 probabilities is only known to ~k float32 epsilons: tails below that floor
    # are rounding, not mass (else a rounded-away Q tail would blow r_P·log(r_P / r_Q) up).
    floor = lp.shape[-1] * torch.finfo(torch.float32).eps
    tail_p = (1.0 - lp.exp().sum(dim=-1)).clamp_min(floor)
    tail_q = (1.0 - lq.exp().sum(dim=-1)).clamp_min(floor)
    tail = tail_p * (tail_p.log() - tail_q.log())
    return head + tail


@torch.inference_mode()
def token_divergences(
    logits_fp: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor, topk: int
) -> dict[str, torch.Tensor]:
    """NLL of Q, KL(P_fp‖P_q), KL(P_q‖P_fp) and the top-k KL(P_fp‖P_q) per position [n] (nats).

    logits_* [n, vocab] float32, targets [n] int64. With z the logits and A = logsumexp(z),
    KL(P‖Q) = Σ p·(z_p − z_q) − (A_p − A_q): two softmaxes, one difference and two batched dot
    products over the vocabulary, the fewest passes over [n, vocab] memory. Rounding can put an
    exact KL a hair below zero; it is clamped at 0 (KL ≥ 0).
    """
    lse_fp = torch.logsumexp(logits_fp, dim=-1)
    lse_q = torch.logsumexp(logits_q, dim=-1)
    diff = (logits_fp - logits_q).unsqueeze(-1)  # [n, vocab, 1]
    shift = lse_fp - lse_q
    forward = torch.bmm(torch.softmax(logits_fp, dim=-1).unsqueeze(1), diff).view(-1) - shift
    backward = shift - torch.bmm(torch.softmax(logits_q, dim=-1).unsqueeze(1), diff).view(-1)
    top, index = logits_fp.topk(min(topk, logits_fp.shape[-1]), dim=-1)
    return {
        "nll_q": lse_q - logits_q.gather(1, targets[:, None]).squeeze(1),
        "kl_fp_q": forward.clamp_min(0.0),
        "kl_q_fp": backward.clamp_min(0.0),
        "kl_fp_q_topk": topk_kl(top - lse_fp[:, None], logits_q.gather(1, index) - lse_q[:, None]),
    }


@torch.inference_mode()
def head_divergences(
    states_fp: torch.Tensor,
    head_fp: torch.nn.Linear,
    states_q: torch.Tensor,
    head_q: torch.nn.Linear,
    targets: torch.Tensor,
    topk: int,
    vocab_block: int | None = None,
) -> dict[str, torch.Tensor]:
    """`token_divergences` of the two models' lm_heads, online over blocks of the vocabulary.

    states_* [n, d_model] (final normed hidden states of the scored positions). Per block b of the
    vocabulary, with block log-sum-exps a_b and in-block softmax weights, Σ_v p_v (z_p − z_q)_v is
    Σ_b e^(a_b − A) Σ_{v∈b} softmax_b(z_p)_v (z_p − z_q)_v: a running log-sum-exp and a rescaled
    running sum per model, and P's top k merged block by block. `group_head_divergences` with one
    quantized model.
    """
    return group_head_divergences(states_fp, head_fp, [(states_q, head_q)], targets, topk, vocab_block)[0]


@torch.inference_mode()
def group_head_divergences(
    states_fp: torch.Tensor,
    head_fp: torch.nn.Linear,
    quantized: Sequence[tuple[torch.Tensor, torch.nn.Linear]],
    targets: torch.Tensor,
    topk: int,
    vocab_block: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """`head_divergences` of the FP head against each (states_q, head_q) of `quantized`, with the FP
    head's blocks computed once for all of them.

    Per block: the FP logits, their in-block softmax, log-sum-exp and top-k merge once; then per
    quantized model its logits, the difference, the two weighted sums and its log-sum-exp. Four
    [n, vocab_block] buffers exist, reused for every block (fresh multi-MB tensors per block fault
    their pages in). Each model's values equal those of its own `head_divergences` call.
    """
    _, vocab_block = head_sizes(states_fp.device, vocab_block=vocab_block)
    n, vocab = states_fp.shape[0], head_fp.weight.shape[0]
    for _, head_q in quantized:
        if head_q.weight.shape[0] != vocab:
            raise ValueError(f"vocabularies differ: {vocab} (FP) vs {head_q.weight.shape[0]} (quantized)")
    k = min(topk, vocab)
    device = states_fp.device
    buffers = [block_buffer(n, vocab, vocab_block, device) for _ in range(4)]
    lse_fp = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
    top_fp = torch.empty(n, 0, dtype=torch.float32, device=device)  # P's top logits so far
    runs = [_Running.start(n, device) for _ in quantized]
    for block in chunk_slices(vocab, vocab_block):
        logits_fp, softmax_fp, logits_q, diff = (block_view(buffer, n, block.stop - block.start) for buffer in buffers)
        head_logits_block(states_fp, head_fp.weight, head_fp.bias, block, out=logits_fp)  # [n, block]
        peak_fp = logits_fp.amax(dim=-1)
        top_fp, merge = _merge_topk(top_fp, logits_fp, k, peak_fp)
        block_lse_fp = softmax_(logits_fp, peak_fp, out=softmax_fp)  # P's in-block softmax; its logits stay
        merged_fp = torch.logaddexp(lse_fp, block_lse_fp)
        for (states_q, head_q), run in zip(quantized, runs, strict=True):
            head_logits_block(states_q, head_q.weight, head_q.bias, block, out=logits_q)
            gather_block_targets(logits_q, targets, block, run.target_q)
            run.top_q = merge(run.top_q, logits_q)
            torch.sub(logits_fp, logits_q, out=diff)
            run.mean_fp = _fold(run.mean_fp, lse_fp, _weighted_sum(softmax_fp, diff), block_lse_fp, merged_fp)
            run.mean_q, run.lse_q = _merge_block(run.mean_q, run.lse_q, logits_q, diff)  # overwrites logits_q
        lse_fp = merged_fp
    return [run.divergences(lse_fp, top_fp) for run in runs]


@dataclass
class _Running:
    """One quantized model's running sums in `group_head_divergences`."""

    mean_fp: torch.Tensor  # Σ p·(z_p − z_q) so far, over the FP log-sum-exp, float64 [n]
    mean_q: torch.Tensor  # Σ q·(z_p − z_q) so far, over lse_q
    lse_q: torch.Tensor  # running log-sum-exp of its logits
    target_q: torch.Tensor  # its target logits, float32 [n]
    top_q: torch.Tensor  # its logits at P's top tokens so far, [n, ≤k]

    @classmethod
    def start(cls, n: int, device: torch.device) -> _Running:
        zeros = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(
            mean_fp=zeros, mean_q=zeros.clone(), lse_q=torch.full_like(zeros, -torch.inf),
            target_q=torch.empty(n, dtype=torch.float32, device=device),
            top_q=torch.empty(n, 0, dtype=torch.float32, device=device),
        )

    def divergences(self, lse_fp: torch.Tensor, top_fp: torch.Tensor) -> dict[str, torch.Tensor]:
        """NLL of Q, KL both ways and the top-k KL per position, given the FP model's final values."""
        shift = lse_fp - self.lse_q
        return {
            "nll_q": self.lse_q - self.target_q.double(),
            "kl_fp_q": (self.mean_fp - shift).clamp_min(0.0),
            "kl_q_fp": (shift - self.mean_q).clamp_min(0.0),
            "kl_fp_q_topk": topk_kl(top_fp - lse_fp[:, None], self.top_q - self.lse_q[:, None]),
        }


_TopkMerge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _merge_topk(
    top_fp: torch.Tensor, logits_fp: torch.Tensor, k: int, peak_fp: torch.Tensor
) -> tuple[torch.Tensor, _TopkMerge]:
    """P's k largest logits so far (sorted, [n, ≤k]) merged with one block (`peak_fp` [n]: the
    block's row maxima of P's logits), and the function that does the same to a quantized model's
    logits at those tokens: `merge(top_q, logits_q)` → its new [n, ≤k] (logits_q: its block).

    Once a row holds k logits, only rows whose block maximum beats their k-th are merged: the
    vocabulary is roughly frequency-ordered, so after the first blocks few rows change.
    """
    if top_fp.shape[1] < k:  # still filling: every row takes the block's top
        values, index = logits_fp.topk(min(k, logits_fp.shape[1]), dim=-1)
        top_fp = torch.cat([top_fp, values], dim=1)
        keep = None
        if top_fp.shape[1] > k:
            top_fp, keep = top_fp.topk(k, dim=-1)

        def fill(top_q: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
            top_q = torch.cat([top_q, logits_q.gather(1, index)], dim=1)
            return top_q if keep is None else top_q.gather(1, keep)

        return top_fp, fill
    rows = (peak_fp > top_fp[:, -1]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return top_fp, lambda top_q, logits_q: top_q
    block_fp = logits_fp.index_select(0, rows)
    values, index = block_fp.topk(min(k, block_fp.shape[1]), dim=-1)
    merged_fp, keep = torch.cat([top_fp.index_select(0, rows), values], dim=1).topk(k, dim=-1)
    top_fp[rows] = merged_fp  # an [n, k] tensor of this pass only

    def merge(top_q: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        merged_q = torch.cat([top_q.index_select(0, rows), logits_q.index_select(0, rows).gather(1, index)], dim=1)
        top_q[rows] = merged_q.gather(1, keep)
        return top_q

    return top_fp, merge


def _weighted_sum(softmax: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Σ_v softmax_v · diff_v per row, float64 [n] (softmax, diff [n, block])."""
    # vecdot, not bmm: a batch of [1, block] · [block, 1] products ran 4x slower (one thread).
    return torch.linalg.vecdot(softmax, diff).double()


def _fold(
    mean: torch.Tensor, lse: torch.Tensor, block_mean: torch.Tensor, block_lse: torch.Tensor, merged: torch.Tensor
) -> torch.Tensor:
    """A running softmax-weighted mean over lse (float64 [n]) with one block's (over block_lse),
    over their merged log-sum-exp `merged` = logaddexp(lse, block_lse)."""
    return mean * torch.exp(lse - merged) + block_mean * torch.exp(block_lse - merged)


def _merge_block(
    mean: torch.Tensor, lse: torch.Tensor, logits: torch.Tensor, diff: torch.Tensor, peak: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block into (Σ softmax·diff, logsumexp), float64 [n]: logits and diff [n, block].

    `logits` is overwritten with its in-block softmax (`softmax_`, given the row maxima `peak` if
    known), whose dot product with diff is the block's weighted mean. The running values are
    float64: KL is a small difference of two large sums (Σ p·Δz and the log-sum-exp shift), and
    float32 running sums lost ~1e-4 nats per token to it.
    """
    block_lse = softmax_(logits, peak)  # logits now hold the block's softmax
    merged = torch.logaddexp(lse, block_lse)
    return _fold(mean, lse, _weighted_sum(logits, diff), block_lse, merged), merged


class _PerExampleSums:
    """Per-example sums of per-position values, accumulated batch by batch."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._rows = Columns(
            example_id=np.int32, n_tokens=np.int32, n_scored=np.int32, **{name: np.float64 for name in self.names}
        )

    def add(self, batch: Batch, positions: ScoredPositions, values: Mapping[str, torch.Tensor]) -> None:
        row = {
            "example_id": batch.example_ids.cpu().numpy(),
            "n_tokens": batch.lengths.cpu().numpy(),
            "n_scored": positions.mask.sum(dim=1).cpu().numpy(),
        }
        row |= {name: positions.per_example_sum(values[name]).cpu().numpy() for name in self.names}
        self._rows.append(len(row["example_id"]), row)

    def columns(self) -> dict[str, np.ndarray]:
        """example_id, n_tokens, n_scored and the per-example mean of every value."""
        scored = self._rows["n_scored"]
        out = {name: self._rows[name] for name in ("example_id", "n_tokens", "n_scored")}
        for name in self.names:
            out[name] = self._rows[name] / np.maximum(scored, 1)
        return out


_VALUES = ("nll_q", "kl_fp_q", "kl_q_fp", "kl_fp_q_topk")


def _divergence_values(
    batch: Batch, fp: ModelState, qs: Sequence[ModelState], topk: int, chunk_tokens: int | None,
    vocab_block: int | None, online: bool,
) -> tuple[ScoredPositions, list[dict[str, torch.Tensor]]]:
    """Per scored position, each quantized model's NLL and its divergences from FP (`_VALUES`,
    float64 [n] each): online over the vocabulary for the quantized models that, like the FP model,
    have a plain lm_head (the FP head's blocks once for all of them), else (or with online=False,
    the straightforward reference) from full logits, one quantized model at a time."""
    positions = ScoredPositions.of(batch)
    n = positions.targets.shape[0]
    values = [{name: torch.empty(n, dtype=torch.float64, device=fp.hidden.device) for name in _VALUES} for _ in qs]

    def store(i: int, part: slice, divergences: Mapping[str, torch.Tensor]) -> None:
        for name, value in divergences.items():
            values[i][name][part] = value.double()

    plain = online and has_plain_lm_head(fp.model)
    heads = [i for i, q in enumerate(qs) if plain and has_plain_lm_head(q.model)]
    if heads:
        head_fp = fp.model.get_output_embeddings()
        states_fp = positions.states(fp.hidden)
        quantized = [(positions.states(qs[i].hidden), qs[i].model.get_output_embeddings()) for i in heads]
        chunk_tokens, _ = head_sizes(states_fp.device, chunk_tokens)
        for part in chunk_slices(n, chunk_tokens):
            chunk = [(states[part], head) for states, head in quantized]
            divergences = group_head_divergences(
                states_fp[part], head_fp, chunk, positions.targets[part], topk, vocab_block
            )
            for i, divergence in zip(heads, divergences, strict=True):
                store(i, part, divergence)
    for i, q in enumerate(qs):
        if i in heads:
            continue
        chunks = zip(
            logit_chunks(fp.model, batch, fp.hidden, positions, chunk_tokens),
            logit_chunks(q.model, batch, q.hidden, positions, chunk_tokens),
            strict=True,
        )
        for (part, logits_fp), (_, logits_q) in chunks:
            store(i, part, token_divergences(logits_fp, logits_q, positions.targets[part], topk))
    return positions, values


class CompareStatistic:
    """NLL of the quantized model and its KL to FP, per example, from one side-by-side pass."""

    def __init__(
        self, model_name: str, method: str, topk: int = DEFAULT_TOPK, chunk_tokens: int | None = None,
        vocab_block: int | None = None, online: bool = True,
    ) -> None:
        if topk < 1:
            raise QbreakError(f"config key kl.topk: must be ≥ 1, got {topk}")
        self.model_name, self.method, self.topk, self.chunk_tokens = model_name, method, topk, chunk_tokens
        self.vocab_block, self.online = vocab_block, online
        self._sums = _PerExampleSums(_VALUES)

    def update(self, batch: Batch, fp: ModelState, q: ModelState) -> None:
        self.add(batch, self.reduce(batch, fp, q))

    def reduce(self, batch: Batch, fp: ModelState, q: ModelState) -> tuple[ScoredPositions, dict[str, torch.Tensor]]:
        """The batch's per-position values (the head's work; no state touched, streams run it at once)."""
        positions, (values,) = _divergence_values(
            batch, fp, [q], self.topk, self.chunk_tokens, self.vocab_block, self.online
        )
        return positions, values

    def add(self, batch: Batch, partial: tuple[ScoredPositions, dict[str, torch.Tensor]]) -> None:
        """Accumulate a batch's values (in batch order)."""
        self._sums.add(batch, *partial)

    def nll_table(self) -> pa.Table:
        """The quantized model's per-example NLL (io.NLL_SCHEMA)."""
        cols = self._sums.columns()
        return _table(cols, self.model_name, self.method, {"nll": cols["nll_q"]}, NLL_SCHEMA)

    def kl_table(self) -> pa.Table:
        """Per-example mean token KL in both directions and the top-k approximation (io.KL_SCHEMA)."""
        cols = self._sums.columns()
        extra = {name: cols[name] for name in ("kl_fp_q", "kl_q_fp", "kl_fp_q_topk")}
        extra["topk"] = np.full(len(cols["example_id"]), self.topk, dtype=np.int32)
        return _table(cols, self.model_name, self.method, extra, KL_SCHEMA)


class GroupCompareStatistic:
    """`CompareStatistic` of several quantized models against one FP model in a group pass
    (`passes.run_group_pass`'s group statistics): the FP head's vocabulary blocks are computed once
    per batch for all of them (`group_head_divergences`). `methods[name]` holds each method's
    tables (`nll_table`, `kl_table`), equal to those of its own side-by-side pass."""

    def __init__(
        self, model_name: str, methods: Sequence[str], topk: int = DEFAULT_TOPK, chunk_tokens: int | None = None,
        vocab_block: int | None = None,
    ) -> None:
        self.methods = {method: CompareStatistic(model_name, method, topk, chunk_tokens, vocab_block) for method in methods}
        self.topk, self.chunk_tokens, self.vocab_block = topk, chunk_tokens, vocab_block

    def update(self, batch: Batch, fp: ModelState, qs: Sequence[ModelState]) -> None:
        self.add(batch, self.reduce(batch, fp, qs))

    def reduce(
        self, batch: Batch, fp: ModelState, qs: Sequence[ModelState]
    ) -> list[tuple[ScoredPositions, dict[str, torch.Tensor]]]:
        """Each method's per-position values of the batch (`qs` in the order of `methods`)."""
        if len(qs) != len(self.methods):
            raise ValueError(f"{len(self.methods)} methods, {len(qs)} quantized models")
        positions, values = _divergence_values(batch, fp, qs, self.topk, self.chunk_tokens, self.vocab_block, True)
        return [(positions, method_values) for method_values in values]

    def add(self, batch: Batch, partial: list[tuple[ScoredPositions, dict[str, torch.Tensor]]]) -> None:
        """Accumulate a batch's values (in batch order)."""
        for statistic, method_partial in zip(self.methods.values(), partial, strict=True):
            statistic.add(batch, method_partial)


def _table(
    cols: Mapping[str, np.ndarray], model_name: str, method: str, extra: Mapping[str, np.ndarray], schema: pa.Schema
) -> pa.Table:
    n = len(cols["example_id"])
    data = {**cols, **extra, "model": [model_name] * n, "method": [method] * n}
    return pa.table({field.name: data[field.name] for field in schema}, schema=schema)


def compare_to_fp(
    fp_model: torch.nn.Module,
    q_model: torch.nn.Module,
    examples: pa.Table,
    model_name: str,
    method: str,
    batch_size: int = 8,
    device: str = "cpu",
    topk: int = DEFAULT_TOPK,
    streams: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(NLL table of the quantized model, KL table) from one side-by-side pass over `examples`;
    `streams` as in run_pair_pass."""
    statistic = CompareStatistic(model_name, method, topk)
    run_pair_pass(fp_model, q_model, iter_batches(examples, batch_size, device), [statistic], streams=streams)
    return statistic.nll_table(), statistic.kl_table()


class _TopkCollector:
    """The FP model's top-k log-probs at every scored position, one row per example."""

    def __init__(self, model_name: str, topk: int, chunk_tokens: int | None = None) -> None:
        self.model_name, self.topk, self.chunk_tokens = model_name, topk, chunk_tokens
        self.rows: list[dict[str, object]] = []

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        positions = ScoredPositions.of(batch)
        n = positions.targets.shape[0]
        logp = torch.empty(n, self.topk, dtype=torch.float32)
        index = torch.empty(n, self.topk, dtype=torch.int32)
        for part, logits in logit_chunks(model, batch, hidden, positions, self.chunk_tokens):
            top, idx = torch.log_softmax(logits, dim=-1).topk(self.topk, dim=-1)
            logp[part], index[part] = top.cpu(), idx.int().cpu()
        counts = positions.mask.sum(dim=1).tolist()
        for example_id, k_logp, k_index in zip(
            batch.example_ids.tolist(), logp.split(counts), index.split(counts), strict=True
        ):
            self.rows.append({"example_id": example_id, "token_ids": k_index.tolist(), "logprobs": k_logp.tolist()})

    def result(self) -> pa.Table:
        n = len(self.rows)
        return pa.table(
            {
                "example_id": [r["example_id"] for r in self.rows],
                "model": [self.model_name] * n,
                "topk": [self.topk] * n,
                "token_ids": [r["token_ids"] for r in self.rows],
                "logprobs": [r["logprobs"] for r in self.rows],
            },
            schema=TOPK_SCHEMA,
        )


def fp_topk_reference(
    fp_model: torch.nn.Module,
    examples: pa.Table,
    model_name: str,
    batch_size: int = 8,
    device: str = "cpu",
    topk: int = DEFAULT_TOPK,
) -> pa.Table:
    """The FP model's top-k next-token log-probs per scored position (io.TOPK_SCHEMA)."""
    collector = _TopkCollector(model_name, topk)
    run_pass(fp_model, iter_batches(examples, batch_size, device), [collector])
    return collector.result()


class TopkReference:
    """Scores a quantized model's top-k KL against a stored FP reference, without running FP."""

    def __init__(self, reference: pa.Table) -> None:
        self.topk = int(reference.column("topk")[0].as_py()) if reference.num_rows else DEFAULT_TOPK
        self._rows = {
            int(i): (torch.tensor(ids, dtype=torch.int64), torch.tensor(lp, dtype=torch.float32))
            for i, ids, lp in zip(
                reference.column("example_id").to_pylist(),
                reference.column("token_ids").to_pylist(),
                reference.column("logprobs").to_pylist(),
                strict=True,
            )
        }
        self._sums = _PerExampleSums(["kl_fp_q_topk", "nll_q"])

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        positions = ScoredPositions.of(batch)
        try:
            stored = [self._rows[i] for i in batch.example_ids.tolist()]
        except KeyError as exc:
            raise QbreakError(f"FP top-k reference has no row for example {exc.args[0]}") from None
        index = torch.cat([ids for ids, _ in stored]).to(hidden.device)
        top = torch.cat([lp for _, lp in stored]).to(hidden.device)
        if index.shape[0] != positions.targets.shape[0]:
            raise QbreakError("FP top-k reference was computed on other examples (scored positions differ)")
        values = {
            "kl_fp_q_topk": torch.empty(index.shape[0], dtype=torch.float64),
            "nll_q": torch.empty(index.shape[0], dtype=torch.float64),
        }
        for part, logits in logit_chunks(model, batch, hidden, positions):
            logp_q = torch.log_softmax(logits, dim=-1)
            values["kl_fp_q_topk"][part] = topk_kl(top[part], logp_q.gather(1, index[part]))
            values["nll_q"][part] = -logp_q.gather(1, positions.targets[part, None]).squeeze(1).double()
        self._sums.add(batch, positions, values)

    def mean_kl(self) -> dict[int, float]:
        """example_id → mean token top-k KL(P_fp‖P_q)."""
        cols = self._sums.columns()
        return dict(zip(cols["example_id"].tolist(), cols["kl_fp_q_topk"].tolist(), strict=True))


def score_against_reference(
    q_model: torch.nn.Module, examples: pa.Table, reference: pa.Table, batch_size: int = 8, device: str = "cpu"
) -> dict[int, float]:
    """Per-example top-k KL(P_fp‖P_q) of `q_model` from a stored FP reference (one quantized pass)."""
    statistic = TopkReference(reference)
    run_pass(q_model, iter_batches(examples, batch_size, device), [statistic])
    return statistic.mean_kl()
