"""Off-policy corrections: weights by hand, composition with any loss, refusal of double IS."""

import math

import pytest
import torch

from drpo_megatron.algorithms import (POLICY_LOSSES, CorrectionConfig,
                                      apply_off_policy_correction, compute_correction_weights,
                                      make_correction_config)

RHO = [0.25, 0.8, 1.0, 1.5, 3.0, 0.45]


def _logps(rho):
    mu = torch.full((len(rho),), math.log(0.4))
    return mu + torch.log(torch.tensor(rho)), mu


def test_token_tis_and_mis_by_hand():
    train, mu = _logps(RHO)
    mask = torch.ones(len(RHO), dtype=torch.bool)
    w, m = compute_correction_weights(train, mu, mask, CorrectionConfig("tis", high=2.0))
    assert w.tolist() == pytest.approx([0.25, 0.8, 1.0, 1.5, 2.0, 0.45])
    assert float(m["mismatch/is_truncated_frac"]) == pytest.approx(1 / 6)
    w, m = compute_correction_weights(train, mu, mask, CorrectionConfig("mis", low=0.5, high=2.0))
    assert w.tolist() == pytest.approx([0.0, 0.8, 1.0, 1.5, 0.0, 0.0])
    assert float(m["mismatch/is_rejected_frac"]) == pytest.approx(3 / 6)
    w, _ = compute_correction_weights(train, mu, mask,
                                      CorrectionConfig("mis", low=0.5, high=2.0, reject_only=True))
    assert w.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert float(m["mismatch/is_ratio_max"]) == pytest.approx(3.0)


def test_sequence_variants_by_hand():
    # seq 0: rho 0.25, 0.8, 1.0 -> prod 0.2, geo (0.2)^(1/3) = 0.5848
    # seq 1: rho 1.5, 3.0, 0.45 -> prod 2.025, geo 2.025^(1/3) = 1.2651
    train, mu = _logps(RHO)
    mask = torch.ones(6, dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    w, _ = compute_correction_weights(train, mu, mask, CorrectionConfig("seq_tis", high=2.0),
                                      seq_ids=seq)
    assert w.tolist() == pytest.approx([0.2] * 3 + [2.0] * 3, rel=1e-5)
    w, _ = compute_correction_weights(train, mu, mask,
                                      CorrectionConfig("seq_mis", low=0.1, high=2.0), seq_ids=seq)
    assert w.tolist() == pytest.approx([0.2] * 3 + [0.0] * 3, rel=1e-5)
    w, m = compute_correction_weights(train, mu, mask,
                                      CorrectionConfig("geo_mis", low=0.5, high=1.2), seq_ids=seq)
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert float(m["mismatch/is_ratio_max"]) == pytest.approx(2.025 ** (1 / 3), rel=1e-5)
    with pytest.raises(ValueError, match="seq_ids"):
        compute_correction_weights(train, mu, mask, CorrectionConfig("geo_mis"))


@pytest.mark.parametrize("loss_name", ["drpo", "ppo_clip", "cispo", "dppo_tv", "tv_penalty"])
def test_correction_scales_any_loss_gradient(loss_name):
    g = torch.Generator().manual_seed(0)
    n = 40
    mu_logp = torch.log(torch.rand(n, generator=g) * 0.9 + 0.05)
    logp = mu_logp + 0.3 * torch.randn(n, generator=g)
    old = mu_logp + 0.5 * torch.randn(n, generator=g)  # recomputed pi_old
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    cfg = CorrectionConfig("mis", low=0.7, high=1.5)
    lp = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES[loss_name](lp, old, adv, mask)
    (g_plain,) = torch.autograd.grad(loss.sum(), lp)
    lp2 = logp.clone().requires_grad_(True)
    loss2, _ = POLICY_LOSSES[loss_name](lp2, old, adv, mask)
    corrected, m = apply_off_policy_correction(loss2, old, mu_logp, mask, cfg, anchor="old_policy")
    (g_corr,) = torch.autograd.grad(corrected.sum(), lp2)
    rho = torch.exp(old - mu_logp)
    c = torch.where(mask & (rho >= 0.7) & (rho <= 1.5), rho, 0.0)
    assert (c == 0).any() and (c > 0).any()
    torch.testing.assert_close(g_corr, c * g_plain)
    assert float(m["mismatch/is_num_tokens"]) == int(mask.sum())


def test_rollout_anchor_refuses_double_importance_weight():
    train, mu = _logps(RHO)
    mask = torch.ones(6, dtype=torch.bool)
    loss = torch.ones(6)
    for cfg in (CorrectionConfig("tis"), CorrectionConfig("mis"), CorrectionConfig("seq_tis")):
        with pytest.raises(ValueError, match="twice"):
            apply_off_policy_correction(loss, train, mu, mask, cfg, anchor="rollout",
                                        seq_ids=torch.zeros(6, dtype=torch.long))
    out, _ = apply_off_policy_correction(loss, train, mu, mask,
                                         CorrectionConfig("mis", reject_only=True),
                                         anchor="rollout")
    assert out.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    out, _ = apply_off_policy_correction(loss, train, mu, mask, CorrectionConfig("none"),
                                         anchor="rollout")
    assert out.tolist() == [1.0] * 6


def test_nonfinite_logprobs_are_dropped_and_counted():
    train, mu = _logps(RHO)
    mu[1] = float("nan")
    train[2] = float("-inf")
    mask = torch.ones(6, dtype=torch.bool)
    loss = torch.full((6,), float("nan"))  # even a NaN loss is zeroed where c = 0
    out, m = apply_off_policy_correction(loss, train, mu, mask, CorrectionConfig("tis"),
                                         anchor="old_policy")
    assert out[1] == 0 and out[2] == 0
    assert float(m["mismatch/is_dropped_nonfinite"]) == 2


def test_config_validation():
    assert CorrectionConfig("mis").low == 0.5 and CorrectionConfig("tis").high == 2.0
    assert make_correction_config({"kind": "geo_mis", "high": "1.02"}).high == 1.02
    with pytest.raises(ValueError, match="kind"):
        CorrectionConfig("ice_pop")  # icepop is a kind since loss.correction
    with pytest.raises(ValueError, match="low"):
        CorrectionConfig("tis", low=0.5)
    with pytest.raises(ValueError, match="low = 3.0"):
        CorrectionConfig("mis", low=3.0, high=2.0)
    with pytest.raises(ValueError, match="high = -1"):
        CorrectionConfig("mis", high=-1)
    with pytest.raises(ValueError, match="unknown key 'threshold'"):
        make_correction_config({"kind": "tis", "threshold": 2})
