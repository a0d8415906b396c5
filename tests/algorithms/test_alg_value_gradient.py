"""The returned per-token value and its autograd gradient are consistent (central finite
differences in float64), for every loss. Together with the weight tests this pins the objective
values, not only the gradients."""

import numpy as np
import pytest
import torch

from alg_testutils import regime_inputs
from drpo_megatron.algorithms import POLICY_LOSSES, make_loss_config
from drpo_megatron.algorithms import losses as losses_mod

H = 1e-6
PARAMS = {"drpo": {"delta": 0.3}, "spo": {"epsilon": 2.0}, "mask_drpo": {"delta": 0.5},
          "kl_penalty": {"delta": 1.0}, "k3_penalty": {"delta": 1.0}, "tv_penalty": {"delta": 1.0},
          "ppo_clip": {"dual_clip_c": 3.0}}


def _inputs():
    logp, mu_logp, adv = (t.double() for t in regime_inputs(seed=7))
    n = logp.numel()
    g = torch.Generator().manual_seed(1)
    k = 3
    topk_mu = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1) - 0.2
    topk_pi = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1) - 0.2
    extra = {"seq_ids": torch.arange(n) // 3, "topk_logp": topk_mu, "topk_logp_policy": topk_pi,
             "sampled_in_topk": torch.arange(n) % 3 == 0}
    return logp, mu_logp, adv, extra


@pytest.mark.parametrize("name", [n for n in POLICY_LOSSES if n not in ("cispo", "gspo")])
def test_elementwise_losses_value_matches_gradient(name):
    logp, mu_logp, adv, extra = _inputs()
    mask = torch.ones_like(logp, dtype=torch.bool)
    cfg = make_loss_config(name, PARAMS.get(name, {}))
    lp = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES[name](lp, mu_logp, adv, mask, cfg, **extra)
    assert loss.dtype == torch.float64
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    plus, _ = POLICY_LOSSES[name](logp + H, mu_logp, adv, mask, cfg, **extra)
    minus, _ = POLICY_LOSSES[name](logp - H, mu_logp, adv, mask, cfg, **extra)
    fd = (plus - minus) / (2 * H)
    scale = grad.abs().max()
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6 * float(scale))


def test_gspo_value_matches_gradient_per_sequence():
    """GSPO's per-token value depends on the whole sequence; the gradient of a token is that of
    the summed sequence objective (seq-mean-token-sum over a sequence)."""
    logp, mu_logp, adv, extra = _inputs()
    n = 18
    logp, mu_logp, seq = logp[:n], mu_logp[:n], extra["seq_ids"][:n]
    adv = adv[:n][seq * 3]  # one advantage per sequence
    mask = torch.ones(n, dtype=torch.bool)
    cfg = make_loss_config("gspo", {"eps_low": 0.5, "eps_high": 0.5})
    lp = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES["gspo"](lp, mu_logp, adv, mask, cfg, seq_ids=seq)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    assert (grad != 0).any()
    for t in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[t] = H
        plus = POLICY_LOSSES["gspo"](logp + e, mu_logp, adv, mask, cfg, seq_ids=seq)[0].sum()
        minus = POLICY_LOSSES["gspo"](logp - e, mu_logp, adv, mask, cfg, seq_ids=seq)[0].sum()
        assert float(grad[t]) == pytest.approx(float((plus - minus) / (2 * H)), rel=1e-5,
                                               abs=1e-7)


def test_cispo_value_is_its_surrogate():
    logp, mu_logp, adv, _ = _inputs()
    loss, _ = POLICY_LOSSES["cispo"](logp, mu_logp, adv, torch.ones_like(logp, dtype=torch.bool),
                                     make_loss_config("cispo", {"c": 2.0}))
    r = torch.exp(logp - mu_logp)
    torch.testing.assert_close(loss, -(r.clamp(max=2.0) * adv * logp))


def test_topk_divergence_chunking_is_invisible(monkeypatch):
    logp, mu_logp, adv, extra = _inputs()
    mask = torch.ones_like(logp, dtype=torch.bool)
    for name in ("dppo_topk_tv", "dppo_topk_kl"):
        cfg = make_loss_config(name, {"delta": 0.05})
        ref = POLICY_LOSSES[name](logp, mu_logp, adv, mask, cfg, **extra)
        monkeypatch.setattr(losses_mod, "_TOPK_CHUNK_ROWS", 7)
        out = POLICY_LOSSES[name](logp, mu_logp, adv, mask, cfg, **extra)
        monkeypatch.undo()
        torch.testing.assert_close(out[0], ref[0])
        assert float(out[1]["loss/divergence_mean"]) == pytest.approx(
            float(ref[1]["loss/divergence_mean"]))
        assert 0 < float(ref[1]["loss/clipfrac_adv_pos"]) + float(ref[1]["loss/clipfrac_adv_neg"])


def test_gradient_is_zero_beyond_the_log_ratio_clamp():
    logp = torch.tensor([-0.1, -0.1, -30.0], dtype=torch.float64, requires_grad=True)
    mu_logp = torch.tensor([-25.0, -0.2, -1.0], dtype=torch.float64)  # log r = 24.9, 0.1, -29
    for name in ("pg_is", "drpo", "spo", "ppo_clip"):
        loss, m = POLICY_LOSSES[name](logp, mu_logp, torch.ones(3, dtype=torch.float64),
                                      torch.ones(3, dtype=torch.bool))
        (g,) = torch.autograd.grad(loss.sum(), logp)
        assert g[0] == 0 and g[2] == 0 and g[1] != 0
        assert float(m["loss/ratio_max"]) == pytest.approx(np.exp(20.0))
