"""Per-example negative log-likelihood, without materializing full-vocabulary log-probabilities.

The NLL of an example is the mean over its tokens of −log p(token | prefix), excluding the first
position (it has no prediction; in qbreak it holds the start token). Log-sum-exp and the target
logit are computed over chunks of positions, so memory traffic stays at one chunk of logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from qbreak.io import NLL_SCHEMA
from qbreak.passes import Batch, iter_batches, run_pass

DEFAULT_CHUNK_TOKENS = 512
# Config attributes that change logits after lm_head; models with them take the plain-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """−log softmax(hidden · weightᵀ + bias)[target] per position, float32 [n].

    hidden [n, d_model], weight [vocab, d_model], targets [n] int64.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        logits = torch.nn.functional.linear(hidden[start:stop], weight, bias).float()  # [chunk, vocab]
        target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
        out[start:stop] = torch.logsumexp(logits, dim=-1) - target_logit
    return out


def has_plain_lm_head(model: torch.nn.Module) -> bool:
    """True when logits are exactly lm_head(final hidden state), so the chunked path applies."""
    head = model.get_output_embeddings()
    config = model.config
    return isinstance(head, torch.nn.Linear) and not any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS
    )


def batch_nll(
    model: torch.nn.Module, batch: Batch, hidden: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64 [batch]) and number of scored tokens ([batch]) of each example."""
    scored = batch.attention_mask[:, 1:].bool()  # [batch, pos-1]: position p predicts token p+1
    targets = batch.input_ids[:, 1:][scored]  # [n]
    row = torch.arange(batch.input_ids.shape[0], device=scored.device)[:, None].expand_as(scored)[scored]
    if has_plain_lm_head(model):
        head = model.get_output_embeddings()
        nll = token_nll(hidden[:, :-1][scored], head.weight, targets, head.bias, chunk_tokens)
    else:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1][scored], dim=-1)
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(batch.input_ids.shape[0], dtype=torch.float64, device=nll.device)
    sums.index_add_(0, row, nll.double())
    return sums, scored.sum(dim=1)


class NLLStatistic:
    """Per-example mean NLL; one row per example (see io.NLL_SCHEMA)."""

    def __init__(self, model_name: str, method: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.model_name = model_name
        self.method = method
        self.chunk_tokens = chunk_tokens
        self._ids: list[np.ndarray] = []
        self._sums: list[np.ndarray] = []
        self._scored: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []

    def update(self, model: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> None:
        sums, scored = batch_nll(model, batch, hidden, self.chunk_tokens)
        self._ids.append(batch.example_ids.cpu().numpy())
        self._sums.append(sums.cpu().numpy())
        self._scored.append(scored.cpu().numpy())
        self._lengths.append(batch.lengths.cpu().numpy())

    def result(self) -> pa.Table:
        n = int(sum(len(i) for i in self._ids))
        sums, scored = _concat(self._sums, np.float64), _concat(self._scored, np.int32)
        return pa.table(
            {
                "example_id": _concat(self._ids, np.int32),
                "model": [self.model_name] * n,
                "method": [self.method] * n,
                "nll": sums / np.maximum(scored, 1),
                "n_tokens": _concat(self._lengths, np.int32),
                "n_scored": scored,
            },
            schema=NLL_SCHEMA,
        )


def _concat(parts: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def per_example_nll(
    model: torch.nn.Module,
    examples: pa.Table,
    model_name: str,
    method: str,
    batch_size: int = 8,
    device: str = "cpu",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> pa.Table:
    """Per-example mean NLL of `model` on `examples` (an examples.arrow table)."""
    statistic = NLLStatistic(model_name, method, chunk_tokens)
    run_pass(model, iter_batches(examples, batch_size, device), [statistic])
    return statistic.result()
