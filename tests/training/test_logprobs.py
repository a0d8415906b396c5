"""drpo_megatron.training.logprobs: chunked vocab-parallel log-probs vs the naive reference.

Tolerances (fp32): the chunked path computes the same fp32 logits (same matmul per row) and
reduces max / sum-exp in a different order than ``log_softmax``: ~1 ulp of log Z (~1e-7 relative,
|log Z| ~ 5-12 here) -> 2e-5 absolute on log-probs. Gradients are sums over V of products of
O(1) numbers (~1e-6 relative reordering error) -> 1e-5 absolute at these sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python, torchrun_args

from drpo_megatron.training.logprobs import naive_logprobs, vocab_parallel_logprobs

ROOT = Path(__file__).resolve().parents[2]
LOGP_ATOL = 2e-5
TOPK_ATOL = 2e-6  # fp32 log-probs near -10 have a 9.5e-7 ulp: 2 ulp (lse subtracted in another order)
GRAD_ATOL = 1e-5


def _inputs(N=53, H=24, V=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (0.6 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return hidden, weight, targets, upstream


def _grads(fn, hidden, weight, upstream):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w)
    logp = out[0] if isinstance(out, tuple) else out
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad, out


@pytest.mark.parametrize("chunk", [1, 7, 16, 53, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_naive(chunk, temperature):
    hidden, weight, targets, up = _inputs()
    lp, gh, gw, out = _grads(lambda h, w: vocab_parallel_logprobs(
        h, w, targets, temperature=temperature, chunk_size=chunk), hidden, weight, up)
    rlp, rgh, rgw, _ = _grads(lambda h, w: naive_logprobs(h, w, targets, temperature),
                              hidden, weight, up)
    assert lp.dtype == torch.float32
    assert (lp - rlp).abs().max() < LOGP_ATOL
    assert (gh - rgh).abs().max() < GRAD_ATOL
    assert (gw - rgw).abs().max() < GRAD_ATOL
    ent = out[1]
    assert not ent.requires_grad
    probs = torch.softmax(hidden @ weight.t() / temperature, dim=-1)
    ref_ent = -(probs * torch.log(probs)).sum(-1)
    assert (ent - ref_ent).abs().max() < LOGP_ATOL


def test_gradcheck_float64():
    hidden, weight, targets, _ = _inputs(N=9, H=5, V=13, dtype=torch.float64)
    # the function computes in fp32: gradcheck with a loose tolerance checks the formula
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    f = lambda h, w: vocab_parallel_logprobs(h, w, targets, chunk_size=4, temperature=0.8)[0]
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_bf16_inputs_compute_in_fp32():
    hidden, weight, targets, up = _inputs(dtype=torch.bfloat16)
    lp, gh, gw, _ = _grads(lambda h, w: vocab_parallel_logprobs(h, w, targets, chunk_size=8),
                           hidden, weight, up)
    ref = naive_logprobs(hidden, weight, targets)  # fp32 math on the same bf16 values
    assert lp.dtype == torch.float32 and (lp - ref).abs().max() < LOGP_ATOL
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_extreme_logits_stay_finite():
    hidden, weight, targets, up = _inputs()
    lp, gh, gw, _ = _grads(lambda h, w: vocab_parallel_logprobs(h * 300, w, targets, chunk_size=8),
                           hidden, weight, up)
    ref = naive_logprobs(hidden * 300, weight, targets)
    assert torch.isfinite(lp).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert (lp - ref).abs().max() < 1e-6 * ref.abs().max() + LOGP_ATOL


def test_empty_and_bad_shapes():
    _, weight, _, _ = _inputs()
    lp, ent = vocab_parallel_logprobs(torch.zeros(0, 24), weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and ent.shape == (0,)
    with pytest.raises(ValueError, match="hidden"):
        vocab_parallel_logprobs(torch.zeros(3, 5), weight, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(torch.zeros(3, 24), weight, torch.zeros(3, dtype=torch.long),
                                temperature=0.0)


def test_tp2_equals_tp1_and_naive(tmp_path):
    out = tmp_path / "tp.json"
    run_python([*torchrun_args(2), ROOT / "tests" / "training" / "logprobs_tp_worker.py", out],
               timeout=180)
    res = json.loads(out.read_text())
    # TP=2 vs TP=1: same fp32 logits, max/sum-exp combined over two halves (reordering only)
    for key, tol in [("logp_tp2_vs_tp1", LOGP_ATOL), ("entropy_tp2_vs_tp1", LOGP_ATOL),
                     ("grad_h_tp2_vs_tp1", GRAD_ATOL), ("grad_w_tp2_vs_tp1", GRAD_ATOL),
                     ("logp_tp2_vs_naive", LOGP_ATOL), ("grad_h_tp2_vs_naive", GRAD_ATOL),
                     ("grad_w_tp2_vs_naive", GRAD_ATOL),
                     # log-probs at extra ids (DPPO top-K; tests/training/test_topk_logprobs.py)
                     ("extra_tp2_vs_naive", TOPK_ATOL), ("extra_tp1_vs_naive", TOPK_ATOL),
                     ("extra_col0_vs_logp", TOPK_ATOL)]:
        assert res[key] < tol, (key, res)
