"""DRPO properties (bounds, maximiser, SPO limit) and the DPPO masking truth table."""

import math

import numpy as np
import pytest
import torch

from alg_testutils import regime_inputs
from drpo_megatron.algorithms import POLICY_LOSSES, make_loss_config

def _ones(t):
    return torch.ones_like(t, dtype=torch.bool)


@pytest.mark.parametrize("delta", [0.5, 2.0, 12.5])
def test_drpo_weight_bounds(delta):
    logp, mu_logp, adv = regime_inputs(seed=3)
    lp = logp.clone().requires_grad_(True)
    loss, m = POLICY_LOSSES["drpo"](lp, mu_logp, adv, _ones(lp),
                                    make_loss_config("drpo", {"delta": delta}))
    (g,) = torch.autograd.grad(loss.sum(), lp)
    r = torch.exp(logp - mu_logp)
    w = (-g / (adv * r)).double()  # weight recovered from autograd
    lo, hi = 1 - 1 / delta, 1 + 1 / delta
    assert w.min() >= lo - 1e-5 and w.max() <= hi + 1e-5
    assert lo - 1e-6 <= float(m["loss/weight_min"]) and float(m["loss/weight_max"]) <= hi + 1e-6
    if delta == 12.5:  # the paper's default: a +-8% tilt around PG-IS
        assert 0.92 - 1e-6 <= w.min() and w.max() <= 1.08 + 1e-6
    if delta == 0.5:  # small delta: some tokens get a corrective (negative) weight
        assert float(m["loss/weight_neg_frac"]) > 0


@pytest.mark.parametrize("mu,adv,delta", [(0.3, 1.0, 0.1), (0.3, -1.0, 0.1), (0.6, 2.0, 0.05),
                                          (0.05, 0.7, 0.15), (0.9, -0.5, 0.2)])
def test_drpo_maximiser_is_mu_plus_sign_a_delta(mu, adv, delta):
    pi = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    n = pi.numel()
    loss, _ = POLICY_LOSSES["drpo"](torch.log(pi), torch.full((n,), math.log(mu)),
                                    torch.full((n,), adv), torch.ones(n, dtype=torch.bool),
                                    make_loss_config("drpo", {"delta": delta}))
    pi_star = float(pi[torch.argmin(loss)])  # loss = -objective
    assert pi_star == pytest.approx(mu + math.copysign(delta, adv), abs=2e-4)


def test_drpo_default_delta_has_no_interior_maximiser():
    """delta = 12.5: pi* = mu +- 12.5 lies outside [0, 1]; the objective is monotone in pi."""
    pi = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    n = pi.numel()
    for adv in (1.0, -1.0):
        loss, _ = POLICY_LOSSES["drpo"](torch.log(pi), torch.full((n,), math.log(0.4)),
                                        torch.full((n,), adv), torch.ones(n, dtype=torch.bool))
        diffs = torch.diff(loss)
        assert (diffs < 0).all() if adv > 0 else (diffs > 0).all()


def test_drpo_without_mu_weighting_is_spo():
    logp, mu_logp, adv = regime_inputs(seed=5)
    for delta in (0.3, 12.5):
        outs = []
        for name, params in (("drpo", {"delta": delta, "mu_weighting": False}),
                             ("spo", {"epsilon": delta})):
            lp = logp.clone().requires_grad_(True)
            loss, _ = POLICY_LOSSES[name](lp, mu_logp, adv, _ones(lp),
                                          make_loss_config(name, params))
            (g,) = torch.autograd.grad(loss.sum(), lp)
            outs.append((loss.detach(), g))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
    # and with mu-weighting on, it is *not* SPO on low-mu tokens
    l1, _ = POLICY_LOSSES["drpo"](logp, mu_logp, adv, _ones(logp),
                                  make_loss_config("drpo", {"delta": 0.3}))
    l2, _ = POLICY_LOSSES["spo"](logp, mu_logp, adv, _ones(logp),
                                 make_loss_config("spo", {"epsilon": 0.3}))
    assert not torch.allclose(l1, l2)


# (pi, A, masked?) with mu = 0.5 and delta = 0.15 (TV) / 0.05 (KL)
TRUTH_TABLE = [
    (0.80, +1.0, True),    # A > 0, pi already far above mu: the update moves further away
    (0.20, -1.0, True),    # A < 0, pi already far below mu: moves further away
    (0.80, -1.0, False),   # A < 0 pushes pi back down towards mu
    (0.20, +1.0, False),   # A > 0 pushes pi back up towards mu
    (0.55, +1.0, False),   # inside the trust region
    (0.45, -1.0, False),
    (0.80, 0.0, False),    # A = 0 is never masked
    (0.20, 0.0, False),
    (0.50, +1.0, False),   # r = 1
]


def _topk_extra(n):
    """K = 1 with the sampled token as the engine's top-1: the top-K losses reduce to binary."""
    return {"sampled_in_topk": torch.ones(n, dtype=torch.bool)}


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl", "dppo_topk_tv", "dppo_topk_kl"])
def test_dppo_truth_table(name):
    pi = torch.tensor([row[0] for row in TRUTH_TABLE])
    adv = torch.tensor([row[1] for row in TRUTH_TABLE])
    expect_masked = torch.tensor([row[2] for row in TRUTH_TABLE])
    n = pi.numel()
    mu_logp = torch.full((n,), math.log(0.5))
    logp = torch.log(pi).requires_grad_(True)
    extra = {}
    if "topk" in name:
        extra = dict(topk_logp=mu_logp.unsqueeze(-1), topk_logp_policy=logp.detach().unsqueeze(-1),
                     **_topk_extra(n))
    loss, m = POLICY_LOSSES[name](logp, mu_logp, adv, torch.ones(n, dtype=torch.bool), None,
                                  **extra)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    r = pi / 0.5
    expected = torch.where(expect_masked, 0.0, -adv * r)
    torch.testing.assert_close(g, expected)
    pos = (expect_masked & (adv > 0)).float().mean()
    neg = (expect_masked & (adv < 0)).float().mean()
    assert float(m["loss/clipfrac_adv_pos"]) == pytest.approx(float(pos))
    assert float(m["loss/clipfrac_adv_neg"]) == pytest.approx(float(neg))
    # the reported weights are the mask itself: A = 0 tokens count as kept (w = 1)
    assert float(m["loss/weight_mean"]) == pytest.approx(1 - float(expect_masked.float().mean()))


def test_dppo_mask_equals_brute_force_on_random_inputs():
    """Masked iff the update moves away from mu beyond delta, over many random tokens."""
    rng = np.random.default_rng(11)
    n = 4000
    mu = rng.uniform(0.01, 0.99, n)
    pi = rng.uniform(0.01, 0.99, n)
    a = rng.choice([-1.0, 0.0, 1.0], n) * rng.uniform(0.1, 2, n)
    lp = torch.tensor(np.log(pi), dtype=torch.float32, requires_grad=True)
    loss, _ = POLICY_LOSSES["dppo_tv"](lp, torch.tensor(np.log(mu), dtype=torch.float32),
                                       torch.tensor(a, dtype=torch.float32),
                                       torch.ones(n, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss.sum(), lp)
    # brute force: does one small ascent step on log pi move |pi - mu| up, beyond delta?
    step = 1e-3 * np.sign(a)
    moves_away = np.abs(pi * np.exp(step) - mu) > np.abs(pi - mu)
    masked_ref = moves_away & (np.abs(pi - mu) > 0.15) & (a != 0)
    assert ((g.numpy() == 0) == (masked_ref | (a == 0))).all()
