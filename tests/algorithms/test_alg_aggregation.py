"""Aggregation: padding invariance, micro-batch additivity with global denominators, bf16."""

import numpy as np
import pytest
import torch

from drpo_megatron.algorithms import (AGGREGATION_MODES, POLICY_LOSSES, aggregate_loss,
                                      count_sequences, make_loss_config, reduce_metrics)

LENGTHS = [3, 7, 1, 5, 4, 6]


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(LENGTHS):
        mu = torch.rand(n, generator=g) * 0.98 + 0.01
        pi = (mu + (torch.rand(n, generator=g) - 0.5) * 0.3).clamp(0.005, 0.995)
        adv = torch.full((n,), float((-1) ** i) * (i + 1) / 3)
        seqs.append((torch.log(pi), torch.log(mu), adv))
    return seqs


def _padded(seqs, width):
    B = len(seqs)
    logp = torch.full((B, width), float("nan"))  # garbage in the padding
    mu = torch.full((B, width), float("-inf"))
    adv = torch.full((B, width), 1e6)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for b, (lp, lm, a) in enumerate(seqs):
        n = lp.numel()
        logp[b, :n], mu[b, :n], adv[b, :n], mask[b, :n] = lp, lm, a, True
    return logp, mu, adv, mask


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_padding_width_invariance(mode):
    seqs = _sequences()
    results = []
    for width in (max(LENGTHS), max(LENGTHS) + 9):
        logp, mu, adv, mask = _padded(seqs, width)
        logp = logp.requires_grad_(True)
        loss, _ = POLICY_LOSSES["drpo"](logp.reshape(-1), mu.reshape(-1), adv.reshape(-1),
                                        mask.reshape(-1), make_loss_config("drpo", {"delta": 0.3}))
        loss = loss.reshape(mask.shape)  # 2-D: rows are sequences
        val = aggregate_loss(loss, mask, mode, horizon=64)
        (g,) = torch.autograd.grad(val, logp)
        assert torch.isfinite(val) and torch.isfinite(g).all()
        results.append((val.detach(), g[:, :max(LENGTHS)]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_microbatch_split_sums_to_full_batch(mode):
    seqs = _sequences(1)
    flat = [torch.cat([s[k] for s in seqs]) for k in range(3)]
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    mask = torch.ones_like(flat[0], dtype=torch.bool)
    mask[4] = False  # one masked token inside a sequence
    cfg = make_loss_config("drpo", {"delta": 0.3})

    def run(idx, **glob):
        lp = flat[0][idx].clone().requires_grad_(True)
        loss, m = POLICY_LOSSES["drpo"](lp, flat[1][idx], flat[2][idx], mask[idx], cfg)
        val = aggregate_loss(loss, mask[idx], mode, seq_ids=seq_ids[idx], horizon=16, **glob)
        (g,) = torch.autograd.grad(val, lp)
        return val.detach(), g, m

    full, g_full, m_full = run(torch.arange(flat[0].numel()))
    glob = dict(global_num_tokens=int(mask.sum()), global_num_seqs=len(LENGTHS))
    boundaries = [0, 3, 3 + 7 + 1, flat[0].numel()]  # micro-batches of whole sequences
    parts = [run(torch.arange(boundaries[i], boundaries[i + 1]), **glob) for i in range(3)]
    assert glob["global_num_seqs"] == sum(
        count_sequences(mask[boundaries[i]:boundaries[i + 1]],
                        seq_ids[boundaries[i]:boundaries[i + 1]]) for i in range(3))
    torch.testing.assert_close(sum(p[0] for p in parts), full)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), g_full)
    # metrics reduced over micro-batches equal the full-batch metrics
    red = reduce_metrics([p[2] for p in parts])
    for k, v in reduce_metrics([m_full]).items():
        assert red[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("name", ["drpo", "ppo_clip", "spo", "dppo_tv", "pg_is"])
def test_bf16_inputs_are_finite_and_close_to_fp32(name):
    seqs = _sequences(2)
    logp32, mu32, adv32 = [torch.cat([s[k] for s in seqs]) for k in range(3)]
    mask = torch.ones_like(logp32, dtype=torch.bool)
    cfg = make_loss_config(name, {"delta": 0.3} if name == "drpo" else {})
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        lp = logp32.to(dtype).requires_grad_(True)
        loss, m = POLICY_LOSSES[name](lp, mu32.to(dtype), adv32.to(dtype), mask, cfg)
        assert loss.dtype == torch.float32
        val = aggregate_loss(loss, mask, "seq-mean-token-sum-norm",
                             seq_ids=torch.repeat_interleave(torch.arange(len(LENGTHS)),
                                                             torch.tensor(LENGTHS)), horizon=8)
        (g,) = torch.autograd.grad(val, lp)
        assert torch.isfinite(val) and torch.isfinite(g).all()
        assert all(torch.isfinite(torch.as_tensor(v)) for v in m.values())
        out[dtype] = (float(val.detach()), g.float())
        # the loss is computed in fp32 from the upcast inputs: exact against fp32 on the same values
        if dtype == torch.bfloat16:
            ref, _ = POLICY_LOSSES[name](lp.detach().float(), mu32.to(dtype).float(),
                                         adv32.to(dtype).float(), mask, cfg)
            torch.testing.assert_close(loss.detach(), ref)
    # bf16 rounding of log-probs (~4e-3 relative) only perturbs the result slightly
    assert out[torch.bfloat16][0] == pytest.approx(out[torch.float32][0], rel=5e-2, abs=5e-3)
    torch.testing.assert_close(out[torch.bfloat16][1], out[torch.float32][1], rtol=5e-2, atol=2e-2)


def test_token_mean_with_local_counts_and_errors():
    loss = torch.tensor([1.0, float("nan"), 3.0])
    mask = torch.tensor([True, False, True])
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(2.0)  # NaN masked
    assert float(aggregate_loss(loss[:0], mask[:0], "token-mean")) == 0.0  # empty: no 0/0
    with pytest.raises(ValueError, match="seq_ids"):
        aggregate_loss(loss, mask, "seq-mean-token-sum")
    with pytest.raises(ValueError, match="horizon"):
        aggregate_loss(loss, mask, "seq-mean-token-sum-norm", seq_ids=torch.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(loss, mask, "mean")


def test_global_counts_as_tensors():
    loss = torch.arange(6.0)
    mask = torch.ones(6, dtype=torch.bool)
    seq = torch.tensor([0, 0, 1, 1, 2, 2])
    v = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", seq_ids=seq,
                       global_num_seqs=torch.tensor(6), horizon=5)
    assert float(v) == pytest.approx(15 / 30)
    assert np.isclose(float(aggregate_loss(loss, mask, "token-mean",
                                           global_num_tokens=torch.tensor(12.0))), 15 / 12)


def test_sparse_global_sequence_ids():
    loss = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.ones(3, dtype=torch.bool)
    seq = torch.tensor([10**12, 10**12, 5])  # global ids far apart: the unique() path
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean", seq_ids=seq)) == \
        pytest.approx((1.5 + 3.0) / 2)


def test_reduce_metrics_ignores_empty_calls():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.7]))
    mu = torch.log(torch.tensor([0.3, 0.5, 0.6]))
    adv = torch.tensor([1.0, -1.0, 0.5])
    _, full = POLICY_LOSSES["drpo"](lp, mu, adv, torch.ones(3, dtype=torch.bool))
    _, empty = POLICY_LOSSES["drpo"](lp, mu, adv, torch.zeros(3, dtype=torch.bool))
    assert float(empty["loss/num_tokens"]) == 0 and float(empty["loss/ratio_min"]) == np.inf
    red = reduce_metrics([full, empty])
    for k, v in reduce_metrics([full]).items():
        assert red[k] == pytest.approx(v), k
