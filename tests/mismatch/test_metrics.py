"""Every mismatch metric against hand-computed values (small tensors, closed forms) and an
independent pure-Python reference implementation (loops over tokens, float64 math)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from drpo_megatron.mismatch import compute_mismatch_metrics, mismatch_histogram_tensors
from drpo_megatron.mismatch.catalog import (ADV_LABELS, METRICS, MU_BIN_LABELS, POSITION_LABELS,
                                            spec_for)
from drpo_megatron.mismatch.histograms import summarize_histogram

LN2 = math.log(2.0)


def approx(x, rel=1e-5, abs=1e-6):  # noqa: A002 - mirrors pytest.approx
    return pytest.approx(x, rel=rel, abs=abs)


# ------------------------------------------------------------------------------------------
# Closed-form example: d = [-ln2, ln2, 0, ln2], r = [1/2, 2, 1, 2]
# ------------------------------------------------------------------------------------------
MU = [0.5, 0.25, 0.5, 0.0125]
PI = [0.25, 0.5, 0.5, 0.025]


def _hand(**kw):
    lp = torch.tensor(PI).log()
    mu = torch.tensor(MU).log()
    return compute_mismatch_metrics(lp, mu, torch.ones(4, dtype=torch.bool), **kw)


def js_f(r):
    return 0.5 * (r * math.log(r) - (1 + r) * math.log((1 + r) / 2))


def test_closed_form_logprob_space():
    m = _hand()
    assert m["mismatch/tokens"] == 4
    assert m["mismatch/logprob_abs_diff"] == approx(3 * LN2 / 4)
    assert m["mismatch/logprob_abs_diff_max"] == approx(LN2)
    assert m["mismatch/logprob_diff_mean"] == approx(LN2 / 4)
    # exp|d| = [2, 2, 1, 2]
    assert m["mismatch/token_mult_prob_error"] == approx(7 / 4)
    # k3 KL(mu||pi): r - 1 - d = [ln2 - 1/2, 1 - ln2, 0, 1 - ln2]
    assert m["mismatch/kl_k3_rollout_train"] == approx((1.5 - LN2) / 4)
    # KL(pi||mu), IS-weighted k3: 1 - r + r d = [1/2 - ln2/2, 2 ln2 - 1, 0, 2 ln2 - 1]
    assert m["mismatch/kl_k3_train_rollout"] == approx((0.5 - LN2 / 2 + 2 * (2 * LN2 - 1)) / 4)
    assert m["mismatch/kl_k1_rollout_train"] == approx(-LN2 / 4)
    assert m["mismatch/js_divergence"] == approx((js_f(0.5) + 2 * js_f(2.0)) / 4)


def test_closed_form_prob_space_and_weights():
    m = _hand(ratio_c=1.5, dppo_tv_delta=0.15)
    # |pi - mu| = [0.25, 0.25, 0, 0.0125]
    assert m["mismatch/prob_abs_diff_mean"] == approx(0.5125 / 4)
    assert m["mismatch/prob_abs_diff_max"] == approx(0.25)
    assert m["mismatch/prob_abs_diff_std"] == approx(statistics.pstdev([0.25, 0.25, 0, 0.0125]))
    assert m["mismatch/prob_pearson"] == approx(statistics.correlation(PI, MU))
    # r^2 - 1 = [-3/4, 3, 0, 3]
    assert m["mismatch/chi2_token"] == approx(5.25 / 4)
    # (sum r)^2 / (N sum r^2) = 5.5^2 / (4 * 9.25)
    assert m["mismatch/is_ess"] == approx(30.25 / 37)
    # c = 1.5: r < 2/3 or r > 1.5 -> tokens 0, 1, 3
    assert m["mismatch/ratio_outside_frac"] == approx(0.75)
    assert m["mismatch/ratio_below_frac"] == approx(0.25)
    assert m["mismatch/ratio_above_frac"] == approx(0.5)
    assert m["mismatch/beyond_dppo_tv_frac"] == approx(0.5)  # 0.25, 0.25 > 0.15
    assert m["mismatch/beyond_delta_frac"] == 0.0  # delta 12.5
    assert _hand(ratio_c=3.0)["mismatch/ratio_outside_frac"] == 0.0


def test_closed_form_mu_bins():
    m = _hand()
    # mu = 0.5, 0.25, 0.5 in [0.1, 1]; 0.0125 in [0.01, 0.1)
    assert m["mismatch/by_mu/1e-1_1/token_frac"] == approx(0.75)
    assert m["mismatch/by_mu/1e-2_1e-1/token_frac"] == approx(0.25)
    assert m["mismatch/by_mu/1e-1_1/logprob_abs_diff"] == approx(2 * LN2 / 3)
    assert m["mismatch/by_mu/1e-2_1e-1/logprob_abs_diff"] == approx(LN2)
    assert m["mismatch/by_mu/1e-2_1e-1/prob_abs_diff_mean"] == approx(0.0125)
    assert m["mismatch/by_mu/1e-1_1/token_mult_prob_error"] == approx(5 / 3)
    for b in ("lt_1e-4", "1e-4_1e-3", "1e-3_1e-2"):
        assert m[f"mismatch/by_mu/{b}/token_frac"] == 0.0
        assert f"mismatch/by_mu/{b}/logprob_abs_diff" not in m  # empty bins: no values


def test_closed_form_drpo_weights_and_dppo_mask():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    m = _hand(advantages=adv, delta=0.5)
    # w = 1 - sign(A (r-1)) |pi-mu| / delta = [1.5, 0.5, 1, 1.025]
    assert m["mismatch/drpo_weight_min"] == approx(0.5)
    assert m["mismatch/drpo_weight_max"] == approx(1.5)
    assert m["mismatch/drpo_weight_mean"] == approx(4.025 / 4)
    assert m["mismatch/drpo_weight_std"] == approx(statistics.pstdev([1.5, 0.5, 1.0, 1.025]))
    assert m["mismatch/drpo_weight_neg_frac"] == 0.0
    assert m["mismatch/drpo_weight_below_one_frac"] == approx(0.25)
    assert m["mismatch/dppo_masked_frac"] == 0.0  # token 1 pushes up but 0.25 < 0.5
    assert m["mismatch/adv_zero_frac"] == 0.0
    m = _hand(advantages=adv, delta=0.2)
    assert m["mismatch/drpo_weight_min"] == approx(1 - 0.25 / 0.2)  # corrective
    assert m["mismatch/drpo_weight_neg_frac"] == approx(0.25)
    assert m["mismatch/dppo_masked_frac"] == approx(0.25)
    assert m["mismatch/beyond_delta_frac"] == approx(0.5)
    # advantage-sign split: pos = tokens 0, 1; neg = tokens 2, 3
    assert m["mismatch/by_adv/pos/logprob_abs_diff"] == approx(LN2)
    assert m["mismatch/by_adv/neg/logprob_abs_diff"] == approx(LN2 / 2)
    assert m["mismatch/by_adv/pos/token_frac"] == approx(0.5)
    # A = 0 tokens: weight 1 would dilute the stats, so they are left out
    m = _hand(advantages=torch.tensor([0.0, 1.0, 0.0, 0.0]), delta=0.5)
    assert m["mismatch/adv_zero_frac"] == approx(0.75)
    assert m["mismatch/drpo_weight_mean"] == approx(0.5)
    assert "mismatch/by_adv/neg/logprob_abs_diff" not in m


def test_closed_form_sequences_and_positions():
    m = _hand(seq_ids=torch.tensor([0, 0, 1, 1]))
    # sequence log-ratios: 0 and ln2 -> rho = 1, 2
    assert m["mismatch/sequences"] == 2
    assert m["mismatch/chi2_seq"] == approx((1 + 4) / 2 - 1)
    assert m["mismatch/is_ess_seq"] == approx(9 / (2 * 5))
    assert m["mismatch/seq_log_ratio_abs_mean"] == approx(LN2 / 2)
    assert m["mismatch/seq_logprob_abs_diff_max"] == approx(LN2)
    # length-2 responses: rank 0 -> 0.25 (early), rank 1 -> 0.75 (late)
    assert m["mismatch/by_pos/early/token_frac"] == approx(0.5)
    assert m["mismatch/by_pos/middle/token_frac"] == 0.0
    assert m["mismatch/by_pos/early/logprob_abs_diff"] == approx(LN2 / 2)  # tokens 0, 2
    assert m["mismatch/by_pos/late/logprob_abs_diff"] == approx(LN2)  # tokens 1, 3
    # Non-contiguous ids: order of appearance defines the position.
    m = _hand(seq_ids=torch.tensor([7, 3, 7, 3]))
    assert m["mismatch/by_pos/early/logprob_abs_diff"] == approx(LN2)  # tokens 0, 1
    assert m["mismatch/by_pos/late/logprob_abs_diff"] == approx(LN2 / 2)  # tokens 2, 3


def test_routing_disagreement_hand_computed():
    rt = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    rr = torch.tensor([[[1, 0], [2, 3]], [[0, 2], [2, 3]], [[4, 5], [0, 1]]])
    lp = torch.tensor([0.5, 0.25, 0.5]).log()
    mu = torch.tensor([0.25, 0.25, 0.125]).log()  # |d| = ln2, 0, 2 ln2
    m = compute_mismatch_metrics(lp, mu, torch.ones(3), routed_experts_train=rt,
                                 routed_experts_rollout=rr)
    assert m["mismatch/moe/route_mismatch_frac"] == approx(2 / 6)
    assert m["mismatch/moe/expert_overlap"] == approx(4.5 / 6)
    assert m["mismatch/moe/token_mismatch_frac"] == approx(2 / 3)
    assert m["mismatch/moe/layer_mismatch_frac_max"] == approx(1 / 3)
    assert m["mismatch/moe/worst_layer"] == 0
    assert m["mismatch/moe/logprob_abs_diff_route_same"] == approx(LN2)
    assert m["mismatch/moe/logprob_abs_diff_route_diff"] == approx(LN2)  # (0 + 2 ln2) / 2
    # [T, K] means one layer; the mask applies
    m = compute_mismatch_metrics(lp, mu, torch.tensor([1, 1, 0]), routed_experts_train=rt[:, 0],
                                 routed_experts_rollout=rr[:, 0])
    assert m["mismatch/moe/route_mismatch_frac"] == approx(0.5)
    with pytest.raises(ValueError, match="together"):
        compute_mismatch_metrics(lp, mu, torch.ones(3), routed_experts_train=rt)
    with pytest.raises(ValueError, match=r"\[T, L, K\]"):
        compute_mismatch_metrics(lp, mu, torch.ones(3), routed_experts_train=rt,
                                 routed_experts_rollout=rr[:2])


def test_nonfinite_excluded_and_counted_and_masked_ignored():
    lp = torch.tensor([0.25, 0.5, 0.5, 0.3, 0.2]).log()
    mu = torch.tensor([0.5, 0.25, 0.5, 0.3, 0.2]).log()
    mu[2] = float("nan")
    mu[3] = float("-inf")
    lp[4] = float("nan")
    mask = torch.tensor([1, 1, 1, 1, 1], dtype=torch.bool)
    m = compute_mismatch_metrics(lp, mu, mask)
    assert m["mismatch/nonfinite_rollout_tokens"] == 2
    assert m["mismatch/nonfinite_train_tokens"] == 1
    assert m["mismatch/tokens"] == 2
    assert m["mismatch/logprob_abs_diff"] == approx(LN2)
    assert all(math.isfinite(v) for k, v in m.items() if "pearson" not in k)
    # non-finite values outside the mask are not counted
    m = compute_mismatch_metrics(lp, mu, torch.tensor([1, 1, 0, 0, 0]))
    assert m["mismatch/nonfinite_rollout_tokens"] == 0 and m["mismatch/masked_tokens"] == 2


def test_empty_and_dtypes_and_no_grad():
    m = compute_mismatch_metrics(torch.zeros(3), torch.zeros(3), torch.zeros(3),
                                 seq_ids=torch.arange(3), advantages=torch.ones(3))
    assert m["mismatch/tokens"] == 0
    assert math.isnan(m["mismatch/logprob_abs_diff"])  # always present, NaN when empty
    assert math.isnan(m["mismatch/chi2_seq"]) and math.isnan(m["mismatch/drpo_weight_mean"])
    lp = torch.tensor(PI).log().to(torch.bfloat16).requires_grad_()
    m = compute_mismatch_metrics(lp, torch.tensor(MU).log(), torch.ones(4))
    assert all(isinstance(v, float) for v in m.values())
    assert m["mismatch/logprob_abs_diff"] == approx(3 * LN2 / 4, rel=2e-2)
    with pytest.raises(ValueError, match="1-D"):
        compute_mismatch_metrics(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="expected 4"):
        compute_mismatch_metrics(torch.zeros(4), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="delta"):
        compute_mismatch_metrics(torch.zeros(4), torch.zeros(4), torch.ones(4), delta=0)


def test_identical_logprobs_are_perfect():
    lp = torch.log(torch.rand(50, generator=torch.Generator().manual_seed(1)))
    m = compute_mismatch_metrics(lp, lp.clone(), torch.ones(50), seq_ids=torch.arange(50) // 10,
                                 advantages=torch.ones(50))
    for k, v in {"logprob_abs_diff": 0, "token_mult_prob_error": 1, "kl_k3_rollout_train": 0,
                 "kl_k3_train_rollout": 0, "js_divergence": 0, "chi2_token": 0, "chi2_seq": 0,
                 "is_ess": 1, "is_ess_seq": 1, "prob_pearson": 1, "ratio_outside_frac": 0,
                 "drpo_weight_mean": 1, "drpo_weight_below_one_frac": 0}.items():
        assert m[f"mismatch/{k}"] == approx(v), k


# ------------------------------------------------------------------------------------------
# Independent reference: plain Python loops, float64, written from the formulas in the docs.
# ------------------------------------------------------------------------------------------
def _ref_token_set(toks, n_total, ratio_c, delta, tv):
    d = [t["d"] for t in toks]
    r = [t["r"] for t in toks]
    pd = [abs(t["pi"] - t["mu"]) for t in toks]
    n = len(toks)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    out = {
        "logprob_abs_diff": mean([abs(x) for x in d]),
        "logprob_abs_diff_max": max(abs(x) for x in d),
        "logprob_diff_mean": mean(d),
        "token_mult_prob_error": mean([math.exp(abs(x)) for x in d]),
        "kl_k1_rollout_train": mean([-x for x in d]),
        "kl_k3_rollout_train": mean([ri - 1 - di for ri, di in zip(r, d)]),
        "kl_k3_train_rollout": mean([1 - ri + ri * di for ri, di in zip(r, d)]),
        "js_divergence": mean([js_f(ri) for ri in r]),
        "prob_abs_diff_mean": mean(pd),
        "prob_abs_diff_max": max(pd),
        "prob_abs_diff_std": statistics.pstdev(pd),
        "chi2_token": mean([ri * ri - 1 for ri in r]),
        "is_ess": sum(r) ** 2 / (n * sum(ri * ri for ri in r)),
        "ratio_outside_frac": mean([float(ri < 1 / ratio_c or ri > ratio_c) for ri in r]),
        "ratio_below_frac": mean([float(ri < 1 / ratio_c) for ri in r]),
        "ratio_above_frac": mean([float(ri > ratio_c) for ri in r]),
        "beyond_delta_frac": mean([float(x > delta) for x in pd]),
        "beyond_dppo_tv_frac": mean([float(x > tv) for x in pd]),
        "token_frac": n / n_total,
    }
    pis, mus = [t["pi"] for t in toks], [t["mu"] for t in toks]
    try:
        out["prob_pearson"] = statistics.correlation(pis, mus)
    except statistics.StatisticsError:
        out["prob_pearson"] = math.nan
    return out


def _reference(lp, mu_lp, mask, seq, adv, delta, ratio_c, tv=0.15):
    lp, mu_lp = [float(x) for x in lp], [float(x) for x in mu_lp]
    T = len(lp)
    # positions from seq ids (order of appearance)
    seen, pos_rank = {}, []
    for s in seq:
        pos_rank.append(seen.get(s, 0))
        seen[s] = seen.get(s, 0) + 1
    toks = []
    for i in range(T):
        if not mask[i] or not (math.isfinite(lp[i]) and math.isfinite(mu_lp[i])):
            continue
        d = lp[i] - mu_lp[i]
        rel = (pos_rank[i] + 0.5) / seen[seq[i]]
        toks.append({"d": d, "r": math.exp(max(-20, min(20, d))), "pi": math.exp(lp[i]),
                     "mu": math.exp(mu_lp[i]), "seq": seq[i], "adv": adv[i],
                     "third": 0 if rel < 1 / 3 else (1 if rel < 2 / 3 else 2)})
    N = len(toks)
    out = {"tokens": N, "masked_tokens": sum(bool(x) for x in mask),
           "nonfinite_rollout_tokens": sum(1 for i in range(T) if mask[i] and not math.isfinite(mu_lp[i])),
           "nonfinite_train_tokens": sum(1 for i in range(T) if mask[i] and not math.isfinite(lp[i]))}
    whole = _ref_token_set(toks, N, ratio_c, delta, tv)
    whole.pop("token_frac")
    out.update(whole)

    def group(prefix, labels, key):
        for gi, lab in enumerate(labels):
            sub = [t for t in toks if key(t) == gi]
            if not sub:
                out[f"{prefix}/{lab}/token_frac"] = 0.0
                continue
            for k, v in _ref_token_set(sub, N, ratio_c, delta, tv).items():
                out[f"{prefix}/{lab}/{k}"] = v

    edges = [1e-4, 1e-3, 1e-2, 1e-1]
    group("by_mu", MU_BIN_LABELS, lambda t: sum(t["mu"] >= e for e in edges))
    group("by_pos", POSITION_LABELS, lambda t: t["third"])
    group("by_adv", ADV_LABELS, lambda t: 0 if t["adv"] > 0 else (1 if t["adv"] < 0 else -1))
    seqs = {}
    for t in toks:
        seqs.setdefault(t["seq"], []).append(t)
    rho = [math.exp(max(-20, min(20, sum(t["d"] for t in v)))) for v in seqs.values()]
    out["sequences"] = len(seqs)
    out["chi2_seq"] = sum(x * x for x in rho) / len(rho) - 1
    out["is_ess_seq"] = sum(rho) ** 2 / (len(rho) * sum(x * x for x in rho))
    out["seq_log_ratio_abs_mean"] = sum(abs(sum(t["d"] for t in v)) for v in seqs.values()) / len(seqs)
    out["seq_logprob_abs_diff_max"] = max(sum(abs(t["d"]) for t in v) / len(v) for v in seqs.values())
    nz = [t for t in toks if t["adv"] != 0]
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    w = [1 - sign(t["adv"] * (t["r"] - 1)) * abs(t["pi"] - t["mu"]) / delta for t in nz]
    out.update({"drpo_weight_min": min(w), "drpo_weight_max": max(w),
                "drpo_weight_mean": sum(w) / len(w), "drpo_weight_std": statistics.pstdev(w),
                "drpo_weight_neg_frac": sum(x < 0 for x in w) / len(w),
                "drpo_weight_below_one_frac": sum(x < 1 for x in w) / len(w),
                "adv_zero_frac": 1 - len(nz) / N,
                "dppo_masked_frac": sum(t["adv"] * (t["r"] - 1) > 0 and abs(t["pi"] - t["mu"]) > delta
                                        for t in toks) / N})
    return {f"mismatch/{k}": float(v) for k, v in out.items()}


@pytest.mark.parametrize("seed,delta,ratio_c", [(0, 12.5, 2.0), (1, 0.05, 1.2), (2, 0.3, 1.05)])
def test_against_reference_every_key(seed, delta, ratio_c):
    g = torch.Generator().manual_seed(seed)
    T = 97
    # mu spread over 1e-6..1 so that every decade bin is populated
    mu_lp = -torch.rand(T, generator=g) * 14.0
    lp = (mu_lp + 0.4 * torch.randn(T, generator=g)).clamp(max=0.0)
    mask = torch.rand(T, generator=g) > 0.15
    mu_lp[5] = float("nan")
    lp[11] = float("inf")
    seq = torch.randint(0, 9, (T,), generator=g)  # interleaved, non-contiguous sequences
    adv = torch.randn(T, generator=g).round()  # includes zeros
    got = compute_mismatch_metrics(lp, mu_lp, mask, seq_ids=seq, advantages=adv, delta=delta,
                                   ratio_c=ratio_c)
    ref = _reference(lp.tolist(), mu_lp.tolist(), mask.tolist(), seq.tolist(), adv.tolist(),
                     delta, ratio_c)
    assert set(got) == set(ref)
    for k in ref:
        if math.isnan(ref[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == approx(ref[k], rel=2e-5, abs=2e-6), k


def test_every_key_is_documented():
    g = torch.Generator().manual_seed(3)
    mu = -torch.rand(200, generator=g) * 12
    lp = mu + 0.1 * torch.randn(200, generator=g)
    rt = torch.randint(0, 8, (200, 2, 2), generator=g)
    m = compute_mismatch_metrics(lp, mu, torch.ones(200), seq_ids=torch.arange(200) // 20,
                                 advantages=torch.randn(200, generator=g),
                                 routed_experts_train=rt, routed_experts_rollout=rt.flip(-1))
    undocumented = sorted(k for k in m if spec_for(k) is None)
    assert not undocumented
    doc = (Path(__file__).resolve().parents[2] / "docs" / "mismatch.md").read_text()
    missing = [name for name in METRICS if f"`{name}`" not in doc]
    assert not missing, f"docs/mismatch.md lacks {missing}"
    for name, spec in METRICS.items():
        assert spec.formula and spec.meaning and spec.healthy, name


def test_histogram_tensors_and_summary():
    lp = torch.tensor(PI).log()
    mu = torch.tensor(MU).log()
    adv = torch.tensor([1.0, 1.0, 0.0, -1.0])
    h = mismatch_histogram_tensors(lp, mu, torch.tensor([1, 1, 1, 0]), advantages=adv, delta=0.5)
    assert h["mismatch/logprob_diff"].tolist() == approx([-LN2, LN2, 0.0])
    assert h["mismatch/is_ratio"].tolist() == approx([0.5, 2.0, 1.0])
    assert h["mismatch/prob_abs_diff"].tolist() == approx([0.25, 0.25, 0.0])
    assert h["mismatch/drpo_weight"].tolist() == approx([1.5, 0.5])  # A != 0 only
    assert h["mismatch/rollout_logprob"].dtype == torch.float32

    s = summarize_histogram(torch.tensor([0.0, 1e-6, 1e-3, 1e-1, 1.0, float("nan")]), bins=6)
    assert s["scale"] == "log" and s["zeros"] == 1 and s["nonfinite"] == 1 and s["n"] == 5
    assert sum(s["counts"]) == 4 and len(s["edges"]) == 7
    assert s["edges"][0] == approx(1e-6) and s["edges"][-1] == approx(1.0)
    assert s["quantiles"]["0.5"] == approx(1e-3)
    s = summarize_histogram(torch.arange(10.0), bins=5)
    assert s["scale"] == "linear" and s["counts"] == [2, 2, 2, 2, 2]
    assert s["min"] == 0 and s["max"] == 9 and s["mean"] == approx(4.5)
    assert s["quantiles"]["0.25"] == approx(2.25)  # numpy-style interpolation
    assert summarize_histogram(torch.tensor([2.0, 2.0]))["counts"] == [2]
    assert summarize_histogram(torch.tensor([]))["n"] == 0
    assert summarize_histogram(torch.tensor([1e-5, 1.0]), scale="linear")["scale"] == "linear"
    assert summarize_histogram(torch.tensor([-1.0, 1.0]), scale="log")["scale"] == "linear"
