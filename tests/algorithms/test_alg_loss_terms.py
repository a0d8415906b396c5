"""The loop's loss terms (``loss.kl`` in the loss / reward, ``loss.correction``): values and
gradients against hand computations written here with plain torch math, and the KL values against
the library estimators."""

import math

import pytest
import torch

from drpo_megatron.algorithms import (POLICY_LOSSES, CorrectionConfig, KLConfig, add_loss_terms,
                                      aggregate_loss, check_loss_options, kl_estimate,
                                      kl_reward_penalty)

T = 12
SEQ = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(T, generator=g, dtype=torch.float64) * 0.8 + 0.1)
    old = mu + 0.4 * torch.randn(T, generator=g, dtype=torch.float64)     # pi_old (train engine)
    logp = old + 0.2 * torch.randn(T, generator=g, dtype=torch.float64)   # pi (current)
    ref = logp + 0.5 * torch.randn(T, generator=g, dtype=torch.float64)   # reference
    adv = torch.tensor([1.0] * 5 + [-0.5] * 4 + [2.0] * 3, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[4] = False
    return mu, old, logp, ref, adv, mask


# ---------------------------------------------------------------- KL estimators, by hand
def _hand_kl(logp, ref, kind):
    """Per-token KL(pi || ref) estimates from their definitions (x = log ref - log pi)."""
    out = []
    for lp, rf in zip(logp.tolist(), ref.tolist()):
        x = rf - lp
        k3 = math.exp(x) - 1 - x
        out.append({"k1": -x, "k2": x * x / 2, "k3": k3, "low_var_kl": min(k3, 10.0)}[kind])
    return torch.tensor(out, dtype=torch.float64)


def _hand_kl_grad(logp, ref, kind):
    """d KL_t / d log pi_t (0 where low_var_kl's cap is active)."""
    out = []
    for lp, rf in zip(logp.tolist(), ref.tolist()):
        x = rf - lp
        g3 = 1 - math.exp(x)
        out.append({"k1": 1.0, "k2": -x, "k3": g3,
                    "low_var_kl": g3 if math.exp(x) - 1 - x < 10 else 0.0}[kind])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_in_the_loss_value_and_gradient(kind):
    mu, _, logp, ref, adv, mask = _batch()
    ref = ref.clone()
    ref[7] = logp[7] + 3.0  # k3 = e^3 - 4 = 16.1: low_var_kl caps it at 10 (no gradient)
    kl = KLConfig(coef=0.25, estimator=kind)
    lp = logp.clone().requires_grad_(True)
    policy, _ = POLICY_LOSSES["pg_is"](lp, mu, adv, mask)
    total, metrics = add_loss_terms(policy, lp, mask, anchor="rollout", kl=kl, ref_logp=ref)
    hand = _hand_kl(logp, ref, kind)
    lib = kl_estimate(logp, ref, kind)
    assert torch.allclose(lib, hand, rtol=1e-6)  # the library estimator is the definition
    m = mask.double()
    assert torch.allclose((total - policy).detach(), 0.25 * hand * m, rtol=1e-6)
    assert float(metrics["loss/kl_ref"]) == pytest.approx(float((hand * m).sum() / m.sum()),
                                                          rel=1e-6)
    loss = aggregate_loss(total, mask, "token-mean")
    loss.backward()
    r = torch.exp(logp - mu)
    hand_grad = (-adv * r + 0.25 * _hand_kl_grad(logp, ref, kind)) * m / m.sum()
    assert torch.allclose(lp.grad, hand_grad, rtol=1e-6, atol=1e-12)


def test_kl_ignores_non_finite_reference_tokens_without_nan_gradients():
    mu, _, logp, ref, adv, mask = _batch()
    ref = ref.clone()
    ref[2] = float("nan")
    ref[4] = float("-inf")  # also masked
    lp = logp.clone().requires_grad_(True)
    policy, _ = POLICY_LOSSES["pg_is"](lp, mu, adv, mask)
    total, m = add_loss_terms(policy, lp, mask, anchor="rollout", kl=KLConfig(coef=1.0),
                              ref_logp=ref)
    aggregate_loss(total, mask, "token-mean").backward()
    assert torch.isfinite(lp.grad).all() and torch.isfinite(m["loss/kl_ref"])
    assert float(lp.grad[2]) == pytest.approx(float(-adv[2] * torch.exp(logp[2] - mu[2]) / 11))


def test_kl_in_reward_penalty_by_hand():
    mu, _, _, ref, _, _ = _batch()
    kl = KLConfig(coef=0.1, estimator="k3", in_reward=True)
    pen = kl_reward_penalty(mu, ref, kl)
    assert torch.allclose(pen, 0.1 * _hand_kl(mu, ref, "k3"), rtol=1e-6)
    mu2 = mu.clone()
    mu2[3] = float("nan")
    assert float(kl_reward_penalty(mu2, ref, kl)[3]) == 0.0


# ---------------------------------------------------------------- corrections, by hand
def _hand_weights(old, mu, kind, low, high, reject_only=False):
    """c_t from rho = pi_old / mu (token), prod / geometric mean over each sequence."""
    rho = torch.exp(old - mu)
    c = torch.zeros(T, dtype=torch.float64)
    for sid in SEQ.unique().tolist():
        idx = (SEQ == sid).nonzero().flatten().tolist()
        valid = [i for i in idx if i != 4]  # token 4 is masked
        for i in idx:
            if kind == "tis":
                c[i] = min(rho[i], high)
            elif kind in ("mis", "icepop"):
                inside = low <= rho[i] <= high
                c[i] = (1.0 if reject_only else rho[i]) if inside else 0.0
            elif kind == "seq_tis":
                c[i] = min(math.prod(rho[j] for j in valid), high)
            elif kind == "geo_mis":
                geo = math.exp(sum(math.log(rho[j]) for j in valid) / len(valid))
                c[i] = 1.0 if low <= geo <= high else 0.0
    return c


CASES = [  # (loss, kind, low, high, reject_only, anchor)
    ("pg_is", "tis", None, 1.5, False, "old_policy"),
    ("drpo", "tis", None, 1.5, False, "old_policy"),
    ("ppo_clip", "icepop", 0.5, 5.0, False, "old_policy"),
    ("drpo", "icepop", 0.7, 1.4, True, "rollout"),
    ("pg_is", "seq_tis", None, 2.0, False, "old_policy"),
    ("drpo", "geo_mis", 0.8, 1.25, False, "rollout"),
]


@pytest.mark.parametrize("loss,kind,low,high,reject_only,anchor", CASES)
def test_corrected_gradient_equals_hand_computed(loss, kind, low, high, reject_only, anchor):
    mu, old, logp, _, adv, mask = _batch(seed=3)
    corr = CorrectionConfig(kind, low=low, high=high, reject_only=reject_only)
    anchor_logp = old if anchor == "old_policy" else mu
    lp = logp.clone().requires_grad_(True)
    policy, _ = POLICY_LOSSES[loss](lp, anchor_logp, adv, mask)
    total, metrics = add_loss_terms(policy, lp, mask, anchor=anchor, correction=corr,
                                    old_logp=old, rollout_logp=mu, seq_ids=SEQ)
    aggregate_loss(total, mask, "seq-mean-token-sum-norm", seq_ids=SEQ, horizon=8).backward()
    # hand: d loss / d logp_t = c_t * (-A_t r_t w_t) / (N_seqs * H), r = pi / anchor
    c = _hand_weights(old, mu, kind, corr.low, corr.high, reject_only)
    r = torch.exp(logp - anchor_logp)
    lp2 = logp.clone().requires_grad_(True)
    plain, _ = POLICY_LOSSES[loss](lp2, anchor_logp, adv, mask)  # uncorrected d loss_t / d logp_t
    plain.sum().backward()
    w_times = lp2.grad  # = -A r w on valid tokens
    hand = c * w_times * mask.double() / (3 * 8)
    assert torch.allclose(lp.grad, hand, rtol=1e-6, atol=1e-12)
    if loss == "pg_is":  # w = 1: the gradient is -c A r exactly
        assert torch.allclose(w_times[mask], (-adv * r)[mask], rtol=1e-6)
    # metrics: loss/correction/*, counted over the 11 valid tokens
    assert float(metrics["loss/correction/num_tokens"]) == 11
    rho = torch.exp(old - mu)
    if kind == "tis":
        assert float(metrics["loss/correction/truncated_frac"]) == pytest.approx(
            float(((rho > high) & mask).sum()) / 11)
    elif kind == "icepop":
        assert float(metrics["loss/correction/rejected_frac"]) == pytest.approx(
            float((((rho < corr.low) | (rho > corr.high)) & mask).sum()) / 11)
    assert float(metrics["loss/correction/weight_mean"]) == pytest.approx(
        float(c[mask].sum()) / 11, rel=1e-6)


def test_icepop_defaults_and_anchor_rules():
    c = CorrectionConfig("icepop")
    assert (c.low, c.high, c.reweights) == (0.5, 5.0, True)
    with pytest.raises(ValueError, match=r"loss.correction.kind='icepop' reweights .* "
                                         r"loss.params.anchor='rollout'.*anchor: old_policy"):
        check_loss_options(c, "rollout")
    check_loss_options(c, "old_policy")
    check_loss_options(CorrectionConfig("icepop", reject_only=True), "rollout")
    check_loss_options(CorrectionConfig("geo_mis"), "rollout")
    with pytest.raises(ValueError, match="reweights"):
        add_loss_terms(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool),
                       anchor="rollout", correction=CorrectionConfig("tis"),
                       old_logp=torch.zeros(3), rollout_logp=torch.zeros(3))


def test_no_terms_is_the_identity():
    mu, _, logp, _, adv, mask = _batch()
    policy, _ = POLICY_LOSSES["drpo"](logp, mu, adv, mask)
    out, m = add_loss_terms(policy, logp, mask, anchor="rollout", kl=KLConfig(),
                            correction=CorrectionConfig())
    assert out is policy and m == {}


@pytest.mark.parametrize("bad,match", [
    ({"coef": -1.0}, r"loss.kl.coef=-1.0 must be >= 0"),
    ({"estimator": "k5"}, r"loss.kl.estimator='k5': choose one of 'k1', 'k2', 'k3' or 'low_var_kl'"),
    ({"in_reward": "yes"}, r"loss.kl.in_reward='yes': expected true or false"),
])
def test_kl_config_errors(bad, match):
    from drpo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, {"loss": {"kl": bad}})
