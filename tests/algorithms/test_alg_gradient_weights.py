"""For every loss: autograd d loss_t / d logp_t == -A_t r_t w_t, with w_t from the table in docs/losses.md,
written here independently in float64 numpy."""

import numpy as np
import pytest
import torch

from alg_testutils import as64, autograd_weight_check, binary_kl, regime_inputs
from drpo_megatron.algorithms import POLICY_LOSSES, make_loss_config


@pytest.fixture(scope="module")
def data():
    logp, mu_logp, adv = regime_inputs()
    lp, lm, a = as64(logp, mu_logp, adv)
    r = np.exp(lp - lm)
    # the inputs cover every regime the weights distinguish
    assert (r > 1).any() and (r < 1).any() and (a > 0).any() and (a < 0).any()
    assert (np.exp(lm) < 0.01).any() and (np.exp(lm) > 0.99).any()
    for cond in [(a > 0) & (r > 1), (a > 0) & (r < 1), (a < 0) & (r > 1), (a < 0) & (r < 1)]:
        assert cond.sum() >= 5
    return logp, mu_logp, adv, np.exp(lp), np.exp(lm), a, r


def test_every_loss_is_covered():
    tested = {"pg_is", "ppo_clip", "cispo", "gspo", "spo", "dppo_tv", "dppo_kl", "dppo_topk_tv",
              "dppo_topk_kl", "drpo", "mask_drpo", "kl_penalty", "k3_penalty", "tv_penalty"}
    assert set(POLICY_LOSSES) == tested


def test_pg_is(data):
    logp, mu_logp, adv, pi, mu, a, r = data
    autograd_weight_check(POLICY_LOSSES["pg_is"], None, logp, mu_logp, adv, np.ones_like(r))


@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip(data, dual):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("ppo_clip", {"dual_clip_c": dual})
    clipped = ((a > 0) & (r > 1.28)) | ((a < 0) & (r < 0.8))
    if dual is not None:
        clipped |= (a < 0) & (r > dual)
    assert clipped.any() and (~clipped).any()
    autograd_weight_check(POLICY_LOSSES["ppo_clip"], cfg, logp, mu_logp, adv,
                          np.where(clipped, 0.0, 1.0))


@pytest.mark.parametrize("c", [1.2, 5.0])
def test_cispo(data, c):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("cispo", {"c": c})
    autograd_weight_check(POLICY_LOSSES["cispo"], cfg, logp, mu_logp, adv, np.minimum(r, c) / r)


@pytest.mark.parametrize("eps", [12.5, 2.0, 0.2])
def test_spo(data, eps):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("spo", {"epsilon": eps})
    w = 1 - np.sign(a * (r - 1)) * np.abs(r - 1) / eps
    autograd_weight_check(POLICY_LOSSES["spo"], cfg, logp, mu_logp, adv, w)


@pytest.mark.parametrize("delta", [12.5, 0.3, 0.05])
def test_drpo(data, delta):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("drpo", {"delta": delta})
    w = 1 - np.sign(a * (r - 1)) * np.abs(pi - mu) / delta
    autograd_weight_check(POLICY_LOSSES["drpo"], cfg, logp, mu_logp, adv, w)


@pytest.mark.parametrize("delta", [0.15, 0.4])
def test_dppo_tv(data, delta):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("dppo_tv", {"delta": delta})
    masked = (a * (r - 1) > 0) & (np.abs(pi - mu) > delta)
    assert masked.any() and (~masked).any()
    autograd_weight_check(POLICY_LOSSES["dppo_tv"], cfg, logp, mu_logp, adv,
                          np.where(masked, 0.0, 1.0))


@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_dppo_kl(data, delta):
    logp, mu_logp, adv, pi, mu, a, r = data
    cfg = make_loss_config("dppo_kl", {"delta": delta})
    masked = (a * (r - 1) > 0) & (binary_kl(mu, pi) > delta)
    assert masked.any() and (~masked).any()
    autograd_weight_check(POLICY_LOSSES["dppo_kl"], cfg, logp, mu_logp, adv,
                          np.where(masked, 0.0, 1.0))
    _, m = POLICY_LOSSES["dppo_kl"](logp, mu_logp, adv, torch.ones_like(logp, dtype=torch.bool),
                                    cfg)
    kl = binary_kl(mu, pi)
    assert float(m["loss/divergence_mean"]) == pytest.approx(kl.mean(), rel=1e-4)
    assert float(m["loss/divergence_max"]) == pytest.approx(kl.max(), rel=1e-4)


def test_mask_drpo(data):
    logp, mu_logp, adv, pi, mu, a, r = data
    delta, mask_delta = 0.5, 0.15
    cfg = make_loss_config("mask_drpo", {"delta": delta, "mask_delta": mask_delta})
    outside = (a * (r - 1) > 0) & (np.abs(pi - mu) > mask_delta)
    assert outside.any() and (~outside).any()
    w = 1 - np.where(outside, np.abs(pi - mu) / delta, 0.0)
    autograd_weight_check(POLICY_LOSSES["mask_drpo"], cfg, logp, mu_logp, adv, w)


@pytest.mark.parametrize("delta", [12.5, 1.0])
def test_penalties(data, delta):
    logp, mu_logp, adv, pi, mu, a, r = data
    s = np.sign(a)
    refs = {
        ("kl_penalty", "forward"): 1 + s / (delta * r),           # phi = -log r
        ("kl_penalty", "reverse"): 1 - s * (1 + np.log(r)) / delta,  # phi = r log r
        ("k3_penalty", None): 1 - s * (1 - 1 / r) / delta,        # phi = r - 1 - log r
        ("tv_penalty", None): 1 - np.sign(a * (r - 1)) / delta,   # phi = |r - 1|
    }
    for (name, direction), w in refs.items():
        params = {"delta": delta}
        if direction:
            params["direction"] = direction
        autograd_weight_check(POLICY_LOSSES[name], make_loss_config(name, params), logp,
                              mu_logp, adv, w)


def test_gspo_sequence_weight(data):
    logp, mu_logp, adv, pi, mu, a, r = data
    n = logp.numel()
    seq_ids = torch.arange(n) // 3  # sequences of 3 tokens
    sid = seq_ids.numpy()
    # one advantage per sequence, as GSPO assumes
    a_seq = np.array([a[sid == i][0] for i in range(sid.max() + 1)])[sid]
    adv_seq = torch.tensor(a_seq, dtype=torch.float32)
    lp, lm = as64(logp, mu_logp)
    seq_lr = np.array([np.mean((lp - lm)[sid == i]) for i in range(sid.max() + 1)])
    s = np.exp(np.clip(seq_lr, -20, 20))[sid]
    for eps_low, eps_high in [(3e-4, 4e-4), (0.5, 0.5)]:
        cfg = make_loss_config("gspo", {"eps_low": eps_low, "eps_high": eps_high})
        clipped = ((a_seq > 0) & (s > 1 + eps_high)) | ((a_seq < 0) & (s < 1 - eps_low))
        assert clipped.any() and (~clipped).any()
        autograd_weight_check(POLICY_LOSSES["gspo"], cfg, logp, mu_logp, adv_seq,
                              np.where(clipped, 0.0, 1.0), ratio_ref=s, seq_ids=seq_ids)


def _topk_case(seed=0, T=60, V=12, K=4, noise=1.2):
    """Full-vocab mu and pi per token; the engine returns mu's top-K; reference divergences."""
    rng = np.random.default_rng(seed)
    logits_mu = rng.normal(0, 2, (T, V))
    logits_pi = logits_mu + rng.normal(0, noise, (T, V))
    mu = np.exp(logits_mu) / np.exp(logits_mu).sum(1, keepdims=True)
    pi = np.exp(logits_pi) / np.exp(logits_pi).sum(1, keepdims=True)
    topk = np.argsort(-mu, axis=1)[:, :K]
    y = np.array([rng.choice(V, p=mu[t]) for t in range(T)])
    tv, kl = np.zeros(T), np.zeros(T)
    for t in range(T):
        buckets = sorted(set(topk[t].tolist()) | {int(y[t])})
        m_b, p_b = mu[t, buckets], pi[t, buckets]
        m_o, p_o = 1 - m_b.sum(), 1 - p_b.sum()
        tv[t] = 0.5 * (np.abs(p_b - m_b).sum() + abs(p_o - m_o))
        kl[t] = (m_b * np.log(m_b / p_b)).sum() + (m_o * np.log(m_o / p_o) if m_o > 0 else 0.0)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    rows = np.arange(T)
    inputs = dict(
        logp=f32(np.log(pi[rows, y])), mu_logp=f32(np.log(mu[rows, y])),
        adv=f32(rng.uniform(0.3, 1.5, T) * np.where(rows % 2 == 0, 1, -1)),
        topk_logp=f32(np.log(np.take_along_axis(mu, topk, 1))),
        topk_logp_policy=f32(np.log(np.take_along_axis(pi, topk, 1))),
        topk_ids=torch.tensor(topk), token_ids=torch.tensor(y),
        in_topk=torch.tensor((topk == y[:, None]).any(1)))
    return inputs, tv, kl


@pytest.mark.parametrize("kind", ["tv", "kl"])
@pytest.mark.parametrize("by_ids", [False, True])
def test_dppo_topk(kind, by_ids):
    inp, tv, kl = _topk_case()
    assert inp["in_topk"].any() and (~inp["in_topk"]).any()  # both bucket layouts occur
    name = f"dppo_topk_{kind}"
    delta = 0.15 if kind == "tv" else 0.05
    div = tv if kind == "tv" else kl
    a = inp["adv"].double().numpy()
    r = np.exp((inp["logp"] - inp["mu_logp"]).double().numpy())
    masked = (a * (r - 1) > 0) & (div > delta)
    assert masked.any() and (~masked).any()
    extra = {"topk_logp": inp["topk_logp"], "topk_logp_policy": inp["topk_logp_policy"]}
    if by_ids:
        extra.update(topk_ids=inp["topk_ids"], token_ids=inp["token_ids"])
    else:
        extra["sampled_in_topk"] = inp["in_topk"]
    autograd_weight_check(POLICY_LOSSES[name], make_loss_config(name, {"delta": delta}),
                          inp["logp"], inp["mu_logp"], inp["adv"], np.where(masked, 0.0, 1.0),
                          **extra)


def test_weight_metrics_match_reference(data):
    """loss/weight_* report the closed-form weight (DRPO's weight distribution)."""
    logp, mu_logp, adv, pi, mu, a, r = data
    delta = 0.3
    w = 1 - np.sign(a * (r - 1)) * np.abs(pi - mu) / delta
    _, m = POLICY_LOSSES["drpo"](logp, mu_logp, adv, torch.ones_like(logp, dtype=torch.bool),
                                 make_loss_config("drpo", {"delta": delta}))
    assert float(m["loss/weight_min"]) == pytest.approx(w.min(), rel=1e-4)
    assert float(m["loss/weight_max"]) == pytest.approx(w.max(), rel=1e-4)
    assert float(m["loss/weight_mean"]) == pytest.approx(w.mean(), rel=1e-4)
    assert float(m["loss/weight_neg_frac"]) == pytest.approx((w < 0).mean())
    assert float(m["loss/prob_diff_gt_delta_frac"]) == pytest.approx(
        (np.abs(pi - mu) > 0.15).mean())
    assert float(m["loss/ratio_max"]) == pytest.approx(r.max(), rel=1e-4)
    assert float(m["loss/num_tokens"]) == logp.numel()
