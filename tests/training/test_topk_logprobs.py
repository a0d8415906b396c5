"""π's log-probs at µ's top-K ids (DPPO top-K) and overlong-filtered samples in the actor.

Fast: ``vocab_parallel_logprobs(..., extra_ids=)`` vs a naive full-vocab fp32 ``log_softmax``
gather, and ``pack_samples`` layout of the top-K tensors / the loss mask.  TP2 of the same
function: tests/training/test_logprobs.py::test_tp2_equals_tp1_and_naive (its worker asks for
extra ids from both vocab shards).

Tolerance: the extra ids' log-probs are ``logit - (m + log Z)`` from the same fp32 matmul as the
reference; only the order of the max / sum-exp reduction differs.  log-probs here are O(1-10):
one fp32 ulp is 1.2e-7 .. 9.5e-7, so 1e-6 absolute at O(1) values, 2e-6 at the -10 tail.

Slow: the real MegatronActor (tiny Qwen3-MoE, fp32) single process and TP2 (torchrun, gloo):
the top-K log-probs the loss receives equal log_softmax of the model's own full output-layer
logits (2e-5, as tests/parallel/test_actor_parallel.py: another matmul), the dppo_topk_tv step
under TP2 equals the single-process step, and a step with two samples ``in_loss=False`` equals a
fresh actor's step on the other six samples only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python, torchrun_args

from drpo_megatron.samples import Sample
from drpo_megatron.training.batch import pack_samples
from drpo_megatron.training.logprobs import naive_logprobs, vocab_parallel_logprobs

ROOT = Path(__file__).resolve().parents[2]


def _inputs(N=41, H=16, V=97, K=7, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = scale * torch.randn(N, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    ids = torch.randint(0, V, (N, K), generator=g)
    ids[:, 0] = targets
    return hidden, weight, targets, ids


@pytest.mark.parametrize("chunk", [1, 8, 41, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extra_ids_equal_naive_log_softmax_gather(chunk, temperature):
    hidden, weight, targets, ids = _inputs()
    logp, ent, extra = vocab_parallel_logprobs(hidden, weight, targets, temperature=temperature,
                                               chunk_size=chunk, extra_ids=ids)
    ref = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1).gather(1, ids)
    assert extra.dtype == torch.float32 and extra.shape == ids.shape
    assert (extra - ref).abs().max() < 1e-6 * max(1.0, float(ref.abs().max()) / 4)
    assert torch.equal(naive_logprobs(hidden, weight, ids, temperature), ref)
    # the targets' log-probs are unchanged by asking for extras, and equal column 0
    logp0, ent0 = vocab_parallel_logprobs(hidden, weight, targets, temperature=temperature,
                                          chunk_size=chunk)
    assert torch.equal(logp, logp0) and torch.equal(ent, ent0)
    assert (extra[:, 0] - logp).abs().max() < 1e-6 * max(1.0, float(ref.abs().max()) / 4)


def test_extra_ids_carry_no_grad_and_leave_grads_unchanged():
    hidden, weight, targets, ids = _inputs()
    up = torch.randn(hidden.shape[0])
    grads = []
    for extra_ids in (None, ids):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = vocab_parallel_logprobs(h, w, targets, chunk_size=8, extra_ids=extra_ids)
        if extra_ids is not None:
            assert not out[2].requires_grad
        (out[0] * up).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_extra_ids_extreme_logits_and_bad_inputs():
    hidden, weight, targets, ids = _inputs(scale=40.0)
    _, _, extra = vocab_parallel_logprobs(hidden, weight, targets, chunk_size=8, extra_ids=ids)
    logits = hidden @ weight.t()
    ref = torch.log_softmax(logits, dim=-1).gather(1, ids)  # same fp32 logits
    assert torch.isfinite(extra).all()  # log-probs down to ~-350: no -inf (exp never taken)
    # logp = logit - lse with |logit|, lse ~ 300: the rounding is relative to the row's logits
    scale = logits.abs().amax(1, keepdim=True).clamp(min=1)
    assert ((extra - ref).abs() / scale).max() < 1e-6
    with pytest.raises(ValueError, match=r"extra_ids must lie in \[0, 97\)"):
        vocab_parallel_logprobs(hidden, weight, targets, extra_ids=ids + 97)
    with pytest.raises(ValueError, match="extra_ids \\[N, K\\] expected"):
        vocab_parallel_logprobs(hidden, weight, targets, extra_ids=ids[:3])
    _, _, empty = vocab_parallel_logprobs(hidden, weight, targets, extra_ids=ids[:, :0])
    assert empty.shape == (hidden.shape[0], 0)


def _sample(p, r, k, in_loss=True, topk=True):
    prompt = list(range(1, p + 1))
    resp = list(range(50, 50 + r))
    return Sample(group_id=0, prompt_ids=prompt, response_ids=resp, rollout_logp=[-0.5] * r,
                  text="", finish_reason="stop", weight_version="0", in_loss=in_loss,
                  topk_ids=[[t + j for j in range(k)] for t in resp] if topk else None,
                  topk_logp=[[-0.1 * (j + 1)] * k for j in range(r)] if topk else None)


def test_pack_samples_topk_layout_and_train_mask():
    a, b = _sample(3, 4, 2), _sample(2, 3, 2, in_loss=False)
    mb = pack_samples([a, b], pad_id=0, seq_len=9, with_topk=True)
    assert mb.topk_ids.shape == (2, 9, 2) and mb.topk_logp.shape == (2, 9, 2)
    # response token k of a sample with prompt length P sits at position P - 1 + k
    assert mb.topk_ids[0, 2:6].tolist() == a.topk_ids and mb.topk_ids[1, 1:4].tolist() == b.topk_ids
    assert torch.equal(mb.topk_logp[0, 2:6], torch.tensor(a.topk_logp))
    assert torch.equal(mb.topk_ids[0][mb.loss_mask[0]][:, 0], mb.targets[0][mb.loss_mask[0]])
    assert mb.topk_ids[0, :2].abs().sum() == 0 and mb.topk_ids[0, 6:].abs().sum() == 0
    assert mb.train_mask[0].equal(mb.loss_mask[0]) and not mb.train_mask[1].any()
    assert mb.loss_mask[1].sum() == 3  # log-probs are still computed for the excluded sample
    assert mb.num_tokens == 4 and mb.num_seqs == 1
    plain = pack_samples([a, b], pad_id=0)
    assert plain.topk_ids is None and plain.topk_logp is None
    with pytest.raises(ValueError, match="the loss needs the rollout engine's top-K"):
        pack_samples([a, _sample(2, 3, 2, topk=False)], pad_id=0, with_topk=True)
    bad = _sample(2, 3, 2)
    bad.topk_ids = bad.topk_ids[:2]
    with pytest.raises(ValueError, match="sample 1 has top-K ids \\(2, 2\\)"):
        pack_samples([a, bad], pad_id=0, with_topk=True)


# ------------------------------------------------------------------ real actor (slow)
def _run(args, timeout=300):
    run_python(args, timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="sized for the CPU path")
def test_actor_topk_single_and_tp2(tmp_path):
    worker = ROOT / "tests" / "training" / "topk_actor_worker.py"
    _run([ROOT / "tests" / "platform" / "megatron_dist_worker.py", "make-hf", tmp_path / "hf"])
    _run([worker, tmp_path / "hf", "single", tmp_path / "single.json"])
    _run([*torchrun_args(2), worker, tmp_path / "hf", "tp2", tmp_path / "tp2.json"])
    single = json.loads((tmp_path / "single.json").read_text())
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    for res in (single, tp2):
        assert res["topk_shape"] == res["ref_shape"] == [40, 5]  # every response token, K ids
        assert res["topk_vs_logits"] < 2e-5, res
        assert 0 < res["step"]["clipfrac"] < 1  # delta 0.02: the top-K TV mask is active
    for key in ("loss", "grad_norm"):
        assert tp2["step"][key] == pytest.approx(single["step"][key], rel=1e-5)
    # in_loss=False == the sample is not in the mini-batch at all (loss, grads, denominators)
    assert single["masked"]["num_tokens"] == single["subset"]["num_tokens"]
    for key in ("loss", "grad_norm"):
        assert single["masked"][key] == pytest.approx(single["subset"][key], rel=1e-5)
