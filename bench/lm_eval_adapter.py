"""lm-eval-harness's `loglikelihood_rolling` (HFLM) on qbreak's examples, token for token.

qbreak's examples are token ids: ids[0] is the model's start token, ids[1:] the document tokens,
and every document token is scored. lm-eval scores a document the same way when its
`prefix_token_id` is that start token and `max_length` covers the document (one rolling window).
`tok_encode` is overridden so lm-eval sees exactly qbreak's ids, never a re-tokenized string.
Bench-only (the `bench` extra): the pipeline never imports lm_eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def lm_eval_nll(
    model: torch.nn.Module, tokenizer: object, rows: Sequence[Sequence[int]], batch_size: int = 8
) -> np.ndarray:
    """Per-example mean NLL (nats per scored token) from lm-eval's loglikelihood_rolling."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    starts = {row[0] for row in rows}
    if len(starts) != 1:
        raise ValueError(f"lm-eval takes one prefix token for every request; the examples start with {starts}")
    documents = {f"doc{i}": list(row[1:]) for i, row in enumerate(rows)}

    class TokenIdHFLM(HFLM):
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):  # noqa: ANN001, ANN201
            ids = documents[string]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):  # noqa: ANN001, ANN202
            # loglikelihood_rolling passes disable_tqdm=False itself; silence the per-chunk bars.
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    head = model.get_output_embeddings().weight
    lm = TokenIdHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max(len(row) for row in rows),
        prefix_token_id=starts.pop(),
        logits_cache=False,
    )
    if model.get_output_embeddings().weight is not head:  # HFLM calls tie_weights(); it must change nothing
        raise RuntimeError("HFLM re-tied the lm_head: lm-eval would score another model")
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(key,), idx=i)
        for i, key in enumerate(documents)
    ]
    summed = np.array(lm.loglikelihood_rolling(requests, disable_tqdm=True), dtype=np.float64)
    return -summed / np.array([len(row) - 1 for row in rows], dtype=np.float64)
