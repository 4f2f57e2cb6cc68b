"""Accuracy of the two KL paths against a float64 reference on one batch (4 examples, RTN W3).

The online path (kl.head_divergences, float64 running sums) vs the full-logit float32 path
(kl.token_divergences); both from the same float32 logits.

    .venv/bin/python bench/kl_accuracy.py
"""
import torch, copy
from pathlib import Path
from qbreak.models import load_model
from qbreak.kl import head_divergences, token_divergences
from qbreak.io import EXAMPLES_SCHEMA, read_table
from qbreak.passes import iter_batches, final_hidden_state
from qbreak.quantize.base import replace_decoder_weights
from qbreak.quantize.rtn import rtn_quantize_tensor
torch.set_num_threads(2)
m = load_model(Path("results/models/smollm2-135m/fp")); q=copy.deepcopy(m)
replace_decoder_weights(q, lambda w: rtn_quantize_tensor(w, 3, 64))
ex = read_table("results/corpus/wikipedia-vital/smollm2-135m/examples.arrow", EXAMPLES_SCHEMA).slice(0, 4)
with torch.inference_mode():
    b = next(iter_batches(ex, 4))
    hf = final_hidden_state(m,b)[:, :-1].reshape(-1,576); hq = final_hidden_state(q,b)[:, :-1].reshape(-1,576)
    t = b.input_ids[:,1:].reshape(-1)
    lf = m.lm_head(hf); lq = q.lm_head(hq)
    lpd = torch.log_softmax(lf.double(),-1); lqd=torch.log_softmax(lq.double(),-1)
    exact = (lpd.exp()*(lpd-lqd)).sum(-1); exact_b=(lqd.exp()*(lqd-lpd)).sum(-1)
    old = token_divergences(lf, lq, t, 32)
    new = head_divergences(hf, m.lm_head, hq, q.lm_head, t, 32, 2048)
    print("mean exact KL (float64)", exact.mean().item())
    print("full-logit path, max per-token error, KL(P_fp||P_q):", (old["kl_fp_q"].double()-exact).abs().max().item(), "mean", (old["kl_fp_q"].double()-exact).mean().item())
    print("online path,     max per-token error, KL(P_fp||P_q):", (new["kl_fp_q"].double()-exact).abs().max().item(), "mean", (new["kl_fp_q"].double()-exact).mean().item())
    print("full-logit path, max per-token error, KL(P_q||P_fp):", (old["kl_q_fp"].double()-exact_b).abs().max().item())
    print("online path,     max per-token error, KL(P_q||P_fp):", (new["kl_q_fp"].double()-exact_b).abs().max().item())
