"""Golden values computed by hand (worked arithmetic in the comments)."""

import math

import pytest
import torch

from drpo_megatron.algorithms import (POLICY_LOSSES, aggregate_loss, compute_advantages,
                                      kl_estimate, make_loss_config)

MU = 0.5


def _run(name, ratios, advs, params=None, **extra):
    ratios = torch.tensor(ratios, dtype=torch.float64)
    n = ratios.numel()
    mu_logp = torch.full((n,), math.log(MU), dtype=torch.float64)
    logp = (mu_logp + torch.log(ratios)).requires_grad_(True)
    loss, m = POLICY_LOSSES[name](logp, mu_logp, torch.tensor(advs, dtype=torch.float64),
                                  torch.ones(n, dtype=torch.bool),
                                  make_loss_config(name, params or {}), **extra)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    return loss.tolist(), g.tolist(), m


def test_ppo_clip_eps_02():
    # eps 0.2 both sides -> clip range [0.8, 1.2]
    # A=+1: r=0.5 -> min(0.5, 0.8)=0.5 (unclipped, grad -r=-0.5); r=1 -> 1 (grad -1);
    #       r=1.5 -> min(1.5, 1.2)=1.2 (clipped, grad 0)
    # A=-1: r=0.5 -> min(-0.5, -0.8)=-0.8 (clipped, grad 0); r=1 -> -1 (grad +1);
    #       r=1.5 -> min(-1.5, -1.2)=-1.5 (unclipped, grad +1.5)
    loss, g, m = _run("ppo_clip", [0.5, 1.0, 1.5, 0.5, 1.0, 1.5], [1, 1, 1, -1, -1, -1],
                      {"eps_low": 0.2, "eps_high": 0.2})
    assert loss == pytest.approx([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5])
    assert g == pytest.approx([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5])
    assert float(m["loss/clipfrac_adv_pos"]) == pytest.approx(1 / 6)
    assert float(m["loss/clipfrac_adv_neg"]) == pytest.approx(1 / 6)
    assert float(m["loss/ratio_mean"]) == pytest.approx(1.0)
    assert float(m["loss/ratio_min"]) == pytest.approx(0.5)
    assert float(m["loss/ratio_max"]) == pytest.approx(1.5)


def test_ppo_dual_clip():
    # A=-1, r=4, c=3: min(-4, -1.2) = -4, then max(-4, 3 * -1) = -3 -> loss 3, grad 0
    # A=-1, r=2, c=3: min(-2, -1.2) = -2, max(-2, -3) = -2 -> loss 2, grad +2
    loss, g, m = _run("ppo_clip", [4.0, 2.0], [-1, -1],
                      {"eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0})
    assert loss == pytest.approx([3.0, 2.0])
    assert g == pytest.approx([0.0, 2.0])
    assert float(m["loss/dual_clipfrac"]) == pytest.approx(0.5)


def test_drpo_and_spo_values():
    # mu=0.5, r=1.2 (pi=0.6), A=1, delta=12.5:
    # DRPO: J = 1.2 - 1/(2*12.5) * 0.5 * 0.2^2 = 1.2 - 0.04*0.02 = 1.1992;
    #       w = 1 - |0.6-0.5|/12.5 = 0.992, grad = -1 * 1.2 * 0.992 = -1.1904
    # SPO (eps 12.5): J = 1.2 - 0.04 * 0.04 = 1.1984; w = 1 - 0.2/12.5 = 0.984, grad -1.1808
    loss, g, m = _run("drpo", [1.2], [1.0])
    assert loss == pytest.approx([-1.1992]) and g == pytest.approx([-1.1904])
    assert float(m["loss/regularizer"]) == pytest.approx(0.0008)
    loss, g, _ = _run("spo", [1.2], [1.0])
    assert loss == pytest.approx([-1.1984]) and g == pytest.approx([-1.1808])
    # A=-2, r=0.8 (pi=0.4), delta=0.5: J = -1.6 - 2/1 * 0.5 * 0.04 = -1.64;
    # w = 1 - sign(-2 * -0.2) * 0.1/0.5 = 0.8, grad = -(-2)(0.8)(0.8) = 1.28
    loss, g, _ = _run("drpo", [0.8], [-2.0], {"delta": 0.5})
    assert loss == pytest.approx([1.64]) and g == pytest.approx([1.28])


def test_cispo_value_and_grad():
    # r=2, c=1.5, A=1, pi = 1.0 -> logp = log(1.0) = 0: J = 1.5 * 1 * 0 = 0; grad = -1.5
    # r=0.5, A=-1, pi = 0.25: J = 0.5 * -1 * log 0.25 = 0.6931; loss -0.6931, grad = +0.5
    loss, g, m = _run("cispo", [2.0, 0.5], [1.0, -1.0], {"c": 1.5})
    assert loss == pytest.approx([0.0, -0.5 * math.log(4)], abs=1e-7)
    assert g == pytest.approx([-1.5, 0.5])
    assert float(m["loss/clipfrac_adv_pos"]) == pytest.approx(0.5)


def test_gspo_sequence_ratio():
    # one 2-token sequence with log ratios 0.1 and 0.3 -> s = exp(0.2) = 1.221403
    # eps_high 0.28: unclipped, every token: loss -s, grad -s
    # default eps_high 4e-4: clipped at 1.0004: loss -1.0004, grad 0
    ratios = [math.exp(0.1), math.exp(0.3)]
    seq = torch.tensor([7, 7])
    loss, g, m = _run("gspo", ratios, [1.0, 1.0], {"eps_high": 0.28}, seq_ids=seq)
    s = math.exp(0.2)
    assert loss == pytest.approx([-s, -s]) and g == pytest.approx([-s, -s])
    assert float(m["loss/seq_ratio_mean"]) == pytest.approx(s)
    loss, g, _ = _run("gspo", ratios, [1.0, 1.0], seq_ids=seq)
    assert loss == pytest.approx([-1.0004, -1.0004]) and g == pytest.approx([0.0, 0.0])


def test_penalty_values():
    # r=1.2, A=1, delta=12.5, |A|/delta = 0.08
    # tv:  J = 1.2 - 0.08*0.2 = 1.184
    # k3:  J = 1.2 - 0.08*(0.2 - ln 1.2) = 1.2 - 0.08*0.0176784 = 1.1985857
    # kl forward: J = 1.2 - 0.08*(-ln 1.2) = 1.2145857; reverse: 1.2 - 0.08*1.2 ln 1.2 = 1.1824973
    ln = math.log(1.2)
    assert _run("tv_penalty", [1.2], [1.0])[0] == pytest.approx([-1.184])
    assert _run("k3_penalty", [1.2], [1.0])[0] == pytest.approx([-(1.2 - 0.08 * (0.2 - ln))])
    assert _run("kl_penalty", [1.2], [1.0])[0] == pytest.approx([-(1.2 + 0.08 * ln)])
    assert _run("kl_penalty", [1.2], [1.0], {"direction": "reverse"})[0] == pytest.approx(
        [-(1.2 - 0.08 * 1.2 * ln)])


def test_aggregation_values():
    # two sequences: [1, 2] and [3, 4, 5] plus one masked token of value 100
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    seq = torch.tensor([0, 0, 1, 1, 1, 1])
    agg = lambda mode, **kw: float(aggregate_loss(loss, mask, mode, seq_ids=seq, **kw))  # noqa
    assert agg("token-mean") == pytest.approx(15 / 5)
    assert agg("seq-mean-token-mean") == pytest.approx((1.5 + 4.0) / 2)
    assert agg("seq-mean-token-sum") == pytest.approx((3 + 12) / 2)
    assert agg("seq-mean-token-sum-norm", horizon=10) == pytest.approx(15 / (2 * 10))
    assert agg("token-mean", global_num_tokens=30) == pytest.approx(0.5)


def test_advantage_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1 mean 0.25; unbiased std = sqrt((0.5625 + 3*0.0625)/3) = 0.5; group 2 constant
    assert compute_advantages(rewards, 4, "dr_grpo").tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert compute_advantages(rewards, 4, "grpo").tolist() == pytest.approx(
        [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], abs=1e-5)
    # leave-one-out: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3
    assert compute_advantages(rewards, 4, "rloo").tolist() == pytest.approx(
        [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0])


def test_kl_values():
    # pi = 0.5, ref = 0.25: log rho = ln 0.5 = -0.693147
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(ln2)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.5 * ln2 ** 2)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(0.5 - 1 + ln2)
