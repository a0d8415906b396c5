"""What every ``mismatch/*`` metric means: formula, reading, healthy range, source.

Pure Python (no torch) so the dashboard can import it cheaply. ``METRICS`` is keyed by the
*base* name; grouped variants reuse the base spec:

    mismatch/<name>                      whole step
    mismatch/by_mu/<bin>/<name>          tokens whose rollout probability mu lies in a decade bin
    mismatch/by_pos/<early|middle|late>/<name>   thirds of each response
    mismatch/by_adv/<pos|neg>/<name>     tokens with positive / negative advantage
    mismatch/moe/<name>                  MoE routing disagreement

Notation: d = log pi - log mu, r = exp(clamp(d, +-20)), pi / mu the probabilities of the sampled
token under the trainer / the rollout engine; means are over valid response tokens.

Thresholds: ``source`` says where a number comes from. "NeMo-RL" / "slime" are the field's
published numbers; "derived" ones are consequences of a published number through a stated
identity (e.g. exp|d| ~ 1 + |d|), not independent evidence; "math" is a bound of the metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["MetricSpec", "Threshold", "METRICS", "GROUP_PREFIXES", "spec_for", "base_name",
           "MU_BIN_LABELS", "POSITION_LABELS", "ADV_LABELS"]

#: Labels of the mu decade bins (edges in :data:`drpo_megatron.mismatch.metrics.MU_BIN_EDGES`).
MU_BIN_LABELS = ("lt_1e-4", "1e-4_1e-3", "1e-3_1e-2", "1e-2_1e-1", "1e-1_1")
#: Thirds of each response.
POSITION_LABELS = ("early", "middle", "late")
#: Advantage sign groups.
ADV_LABELS = ("pos", "neg")


@dataclass(frozen=True)
class Threshold:
    """A horizontal marker for the dashboard.

    kind: "ideal" (where a perfect match sits), "reference" (a measured healthy value),
    "warn" (investigate when crossed in ``direction``: "above" or "below").
    """

    value: float
    kind: str
    label: str
    source: str
    direction: str = "above"
    note: str = ""  # how a "derived" number follows from a published one


@dataclass(frozen=True)
class MetricSpec:
    name: str
    formula: str
    meaning: str
    healthy: str
    thresholds: tuple[Threshold, ...] = field(default_factory=tuple)
    log_scale: bool = False  # spans orders of magnitude: plot on a log axis


def _t(value, kind, label, source, direction="above", note=""):
    return Threshold(value, kind, label, source, direction, note)


_ESS = "1 ideal (all weights equal); falls as the ratios spread: ESS = 1/(1 + chi2) in expectation."

METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    # ---- counts ----------------------------------------------------------------------------
    MetricSpec("tokens", "sum_t valid_t", "valid response tokens in the step (mask & finite)",
               "-"),
    MetricSpec("masked_tokens", "sum_t mask_t", "tokens selected by the mask", "-"),
    MetricSpec("nonfinite_rollout_tokens", "sum_t mask_t * 1[log mu_t not finite]",
               "masked tokens whose rollout log-prob is NaN/inf (excluded from every metric)",
               "0; anything else is an engine / plumbing bug",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("nonfinite_train_tokens", "sum_t mask_t * 1[log pi_t not finite]",
               "masked tokens whose trainer log-prob is NaN/inf (excluded)", "0",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("token_frac", "n_group / n_valid", "share of the step's valid tokens in a group",
               "-"),
    MetricSpec("sequences", "#sequences with >= 1 valid token", "sequences in the step", "-"),
    # ---- log-prob space ----------------------------------------------------------------------
    MetricSpec("logprob_abs_diff", "mean_t |d_t|",
               "mean absolute log-prob gap (slime's train_rollout_logprob_abs_diff)",
               "0 ideal; BF16 dense Qwen3-4B ~ 0.011 (slime); FP8 rollout and MoE higher",
               (_t(0.0, "ideal", "0", "math"),
                _t(0.011, "reference", "BF16 Qwen3-4B ~0.011", "slime"),
                _t(0.05, "warn", "~ mult. error 1.05", "derived", "above",
                   "NeMo-RL's 1.05 on mean exp|d|, through exp|d| ~ 1 + |d|"))),
    MetricSpec("logprob_abs_diff_max", "max_t |d_t|", "worst single-token log-prob gap",
               "grows with T; spikes (> 1) point at individual broken tokens", log_scale=True),
    MetricSpec("logprob_diff_mean", "mean_t d_t",
               "signed bias: > 0 the trainer is more confident than the engine", "0 ideal",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("token_mult_prob_error", "mean_t exp(|d_t|)",
               "mean multiplicative probability error max(pi/mu, mu/pi) (NeMo-RL)",
               "1.0 ideal; investigate > 1.05 (NeMo-RL)",
               (_t(1.0, "ideal", "1.0", "math"),
                _t(1.05, "warn", "investigate > 1.05", "NeMo-RL"))),
    MetricSpec("kl_k1_rollout_train", "mean_t (-d_t)",
               "k1 (plain log-ratio) estimate of KL(mu || pi); unbiased but noisy, can be < 0",
               "~0"),
    MetricSpec("kl_k3_rollout_train", "mean_t (r_t - 1 - d_t)",
               "k3 estimate of KL(mu || pi) (NeMo-RL gen_kl_error, verl rollout k3_kl); ~ E[d^2]/2",
               "0 ideal; ~ mean|d|^2/2 or more: 1.25e-3 corresponds to mean|d| = 0.05",
               (_t(0.0, "ideal", "0", "math"),
                _t(1.25e-3, "warn", "~ mean|d| 0.05", "derived", "above",
                   "k3 ~ E[d^2]/2 >= (E|d|)^2/2; E|d| = 0.05 is NeMo-RL's 1.05")), log_scale=True),
    MetricSpec("kl_k3_train_rollout", "mean_t (1 - r_t + r_t d_t)",
               "importance-weighted k3 estimate of KL(pi || mu) (NeMo-RL policy_kl_error "
               "direction)", "0 ideal; same scale as kl_k3_rollout_train",
               (_t(0.0, "ideal", "0", "math"),
                _t(1.25e-3, "warn", "~ mean|d| 0.05", "derived", "above",
                   "k3 ~ E[d^2]/2 >= (E|d|)^2/2; E|d| = 0.05 is NeMo-RL's 1.05")), log_scale=True),
    MetricSpec("js_divergence", "mean_t 1/2 [r_t d_t - (1 + r_t) log((1 + r_t)/2)]",
               "sample estimate of Jensen-Shannon(mu, pi); symmetric, ~ E[d^2]/8",
               "0 ideal; true value <= log 2",
               (_t(0.0, "ideal", "0", "math"),), log_scale=True),
    # ---- probability space -------------------------------------------------------------------
    MetricSpec("prob_abs_diff_mean", "mean_t |pi_t - mu_t|",
               "mean absolute probability gap (verl rollout_probs_diff_mean); the quantity "
               "DRPO's penalty and DPPO's boundary are written in", "0 ideal",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("prob_abs_diff_max", "max_t |pi_t - mu_t|", "worst probability gap (<= 1)",
               "compare with delta: > delta means tokens beyond the trust region",
               (_t(0.0, "ideal", "0", "math"),
                _t(0.15, "reference", "DPPO-TV delta 0.15", "DPPO default"))),
    MetricSpec("prob_abs_diff_std", "std_t |pi_t - mu_t| (population)", "spread of the gap",
               "0 ideal"),
    MetricSpec("prob_pearson", "corr_t(pi_t, mu_t) (Pearson)",
               "agreement of the two engines in probability space (verl)",
               "1 ideal",
               (_t(1.0, "ideal", "1", "math", "below"),)),
    # ---- importance weights ----------------------------------------------------------------
    MetricSpec("chi2_token", "mean_t r_t^2 - 1",
               "chi^2(pi || mu) per token (verl rollout_corr chi2_token); dominated by low-mu "
               "tokens (why SPO-style ratio penalties are fragile)", "0 ideal",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("chi2_seq", "mean_s rho_s^2 - 1, rho_s = exp(clamp(sum_{t in s} d_t, +-20))",
               "chi^2 of the sequence-level ratio; explodes with response length",
               "0 ideal; grows ~ exponentially with length at fixed token mismatch",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("is_ess", "(sum_t r_t)^2 / (N sum_t r_t^2)",
               "normalised effective sample size of token IS weights", _ESS,
               (_t(1.0, "ideal", "1", "math", "below"),)),
    MetricSpec("is_ess_seq", "(sum_s rho_s)^2 / (S sum_s rho_s^2)",
               "normalised ESS of sequence IS weights", _ESS,
               (_t(1.0, "ideal", "1", "math", "below"),)),
    MetricSpec("ratio_outside_frac", "mean_t 1[r_t < 1/c or r_t > c]",
               "share of tokens a [1/c, c] truncation / masking (TIS, IcePop, MIS) would touch",
               "0 ideal; c = ratio_c (default 2)", (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("ratio_below_frac", "mean_t 1[r_t < 1/c]", "low side of ratio_outside_frac", "0"),
    MetricSpec("ratio_above_frac", "mean_t 1[r_t > c]", "high side of ratio_outside_frac", "0"),
    MetricSpec("seq_log_ratio_abs_mean", "mean_s |sum_{t in s} d_t|",
               "sequence-level log-ratio magnitude (what GSPO-style sequence ratios see)", "0"),
    MetricSpec("seq_logprob_abs_diff_max", "max_s mean_{t in s} |d_t|",
               "the worst sequence's mean gap (finds single broken samples)", "0"),
    # ---- trust region (ours) ---------------------------------------------------------------
    MetricSpec("beyond_delta_frac", "mean_t 1[|pi_t - mu_t| > delta]",
               "tokens beyond the DPPO-TV boundary at the configured delta (DRPO's stationary "
               "point pi* = mu + sign(A) delta)",
               "0 with delta = 12.5 (always: |pi - mu| <= 1); with delta < 1 it is the share "
               "of tokens where the trust region is active"),
    MetricSpec("beyond_dppo_tv_frac", "mean_t 1[|pi_t - mu_t| > 0.15]",
               "tokens beyond DPPO Binary-TV's default boundary 0.15 (reference, whatever delta "
               "the run uses)", "0 ideal; mismatch alone should not push tokens past it",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("dppo_masked_frac", "mean_t 1[A_t (r_t - 1) > 0 and |pi_t - mu_t| > delta]",
               "tokens DPPO-TV at the configured delta would mask from mismatch alone (pi is the "
               "trainer's policy before the step's updates)", "0 ideal; can be > 0 only with "
               "delta < 1", (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("adv_zero_frac", "mean_t 1[A_t = 0]",
               "tokens without gradient (e.g. groups with identical rewards)", "-"),
    MetricSpec("drpo_weight_min",
               "min_{t: A_t != 0} w_t, w_t = 1 - sign(A_t (r_t - 1)) |pi_t - mu_t| / delta",
               "smallest DRPO gradient weight; bounded below by 1 - 1/delta",
               "delta = 12.5: in [0.92, 1] (PG-IS with a smooth tilt); < 0 needs delta < 1"),
    MetricSpec("drpo_weight_mean", "mean_{t: A_t != 0} w_t", "average DRPO gradient weight",
               "~1 when pi ~ mu", (_t(1.0, "ideal", "1", "math", "below"),)),
    MetricSpec("drpo_weight_max", "max_{t: A_t != 0} w_t", "largest weight; <= 1 + 1/delta", "-"),
    MetricSpec("drpo_weight_std", "std_{t: A_t != 0} w_t", "spread of DRPO weights", "-"),
    MetricSpec("drpo_weight_neg_frac", "mean_{t: A_t != 0} 1[w_t < 0]",
               "corrective tokens: the penalty reverses the policy-gradient direction",
               "0 with delta >= 1 (the paper default); with small delta, the share of tokens "
               "being pulled back to mu"),
    MetricSpec("drpo_weight_below_one_frac", "mean_{t: A_t != 0} 1[w_t < 1]",
               "tokens the trust region damps (pi already moved the way A pushes)", "-"),
    # ---- MoE routing -----------------------------------------------------------------------
    MetricSpec("route_mismatch_frac", "mean_{t,l} 1[S_train(t,l) != S_rollout(t,l)]",
               "share of (token, layer) pairs whose top-K expert set differs between the "
               "trainer and the engine", "0 ideal; > 0 is expected for MoE without router "
               "replay (MoE mismatch >> dense); router replay (R3) makes training reuse the "
               "engine's experts",
               (_t(0.0, "ideal", "0", "math"),)),
    MetricSpec("expert_overlap", "mean_{t,l} |S_train ∩ S_rollout| / K",
               "average share of the K experts both routers chose", "1 ideal",
               (_t(1.0, "ideal", "1", "math", "below"),)),
    MetricSpec("token_mismatch_frac", "mean_t 1[any layer routes differently]",
               "tokens with at least one routing difference", "0 ideal"),
    MetricSpec("layer_mismatch_frac_max", "max_l mean_t 1[S_train(t,l) != S_rollout(t,l)]",
               "the worst layer's routing mismatch", "0 ideal"),
    MetricSpec("worst_layer", "argmax_l of the above", "index of that layer", "-"),
    MetricSpec("logprob_abs_diff_route_same", "mean_{t: routing agrees} |d_t|",
               "log-prob gap on tokens routed identically", "compare with route_diff"),
    MetricSpec("logprob_abs_diff_route_diff", "mean_{t: routing differs} |d_t|",
               "log-prob gap on tokens routed differently; >> route_same means routing "
               "disagreement drives the mismatch (use router replay)", "close to route_same"),
]}

GROUP_PREFIXES = {
    "by_mu": "rollout probability mu in a decade bin: lt_1e-4, 1e-4_1e-3, 1e-3_1e-2, 1e-2_1e-1, 1e-1_1",
    "by_pos": "relative position (j + 0.5)/L in the response: early < 1/3 <= middle < 2/3 <= late",
    "by_adv": "sign of the advantage: pos (A > 0), neg (A < 0); A = 0 tokens are left out",
    "moe": "MoE routing disagreement (needs routed experts from both sides)",
}


def base_name(key: str) -> str:
    """``mismatch/by_mu/1e-3_1e-2/logprob_abs_diff`` -> ``logprob_abs_diff``."""
    return key.rsplit("/", 1)[-1]


def spec_for(key: str) -> Optional[MetricSpec]:
    """The spec of a (possibly grouped) ``mismatch/`` key, or None for other namespaces."""
    if not key.startswith("mismatch/"):
        return None
    return METRICS.get(base_name(key))
