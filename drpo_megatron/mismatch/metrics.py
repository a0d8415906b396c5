"""Training-vs-inference mismatch metrics (pure torch, no Megatron / SGLang imports).

Inputs are 1-D tensors of length ``T`` over the packed *response* tokens of one RL step:

* ``logp``          -- log pi(y_t | s_t): the trainer's fp32 log-prob of the sampled token.
* ``rollout_logp``  -- log mu(y_t | s_t): the rollout engine's log-prob of the same token.
* ``mask``          -- bool / 0-1; tokens with ``mask == 0`` are ignored everywhere.
* ``seq_ids``       -- int, the sequence each token belongs to. Tokens of one sequence appear in
                       response order (they need not be contiguous); the position of a token
                       within its response is its rank among the tokens with the same id.
* ``advantages``    -- float, the advantage A_t of each token (the sequence advantage broadcast).

Notation used in every formula below (per valid token t):

    d_t = log pi_t - log mu_t                       (log-ratio, unclamped)
    r_t = exp(clamp(d_t, -20, 20))                  (importance ratio pi/mu)
    pi_t = exp(log pi_t),  mu_t = exp(log mu_t)     (probabilities of the sampled token)

A token is *valid* when ``mask`` is set and both log-probs are finite. Non-finite log-probs
inside the mask are excluded and counted (``mismatch/nonfinite_rollout_tokens`` /
``mismatch/nonfinite_train_tokens``). All reductions are over valid tokens; means are plain
token means (every valid token of the step has weight 1), sequence metrics are means over
sequences with at least one valid token.

The tokens are sampled from mu, so every "expectation" here is an expectation under mu; where a
metric estimates a quantity under pi it is importance-weighted by r (stated per metric).

Everything runs under ``torch.no_grad()`` in fp32 (per-token math) with fp64 accumulators for
sums, on whatever device the inputs live on; the result is a ``dict[str, float]``.

See :mod:`drpo_megatron.mismatch.catalog` for each metric's meaning and healthy range, and
``docs/mismatch.md`` for the user-facing description.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .catalog import ADV_LABELS, MU_BIN_LABELS, POSITION_LABELS

__all__ = [
    "LOG_RATIO_CLAMP",
    "MU_BIN_EDGES",
    "MU_BIN_LABELS",
    "POSITION_LABELS",
    "DRPO_DELTA_DEFAULT",
    "DPPO_TV_DELTA_DEFAULT",
    "RATIO_C_DEFAULT",
    "compute_mismatch_metrics",
    "mismatch_histogram_tensors",
    "token_log_ratio",
    "token_is_ratio",
    "token_mult_prob_error",
    "token_k3_kl_rollout_train",
    "token_k3_kl_train_rollout",
    "token_js",
    "token_chi2",
    "drpo_gradient_weight",
]

# --------------------------------------------------------------------------------------------
# Constants (each with its reason)
# --------------------------------------------------------------------------------------------

#: Clamp on the log-ratio before ``exp``. Both DRPO reference implementations clamp at +-20;
#: e^20 ~ 4.9e8 so r^2 ~ 2.4e17 stays finite in fp32 (max ~3.4e38).
LOG_RATIO_CLAMP = 20.0

#: Decade edges of the mu bins. Mismatch concentrates on low-probability tokens (DRPO's
#: argument against chi^2 / ratio trust regions), so we resolve mu per decade from 1e-4 to 1.
#: Tokens with mu < 1e-4 get their own "lt_1e-4" bin; mu >= 0.1 (including rounding above 1)
#: falls into the last bin.
MU_BIN_EDGES = (1e-4, 1e-3, 1e-2, 1e-1)

#: Response-position thirds. A token at 0-based rank j of a response of length L has relative
#: position (j + 0.5) / L (symmetric: a 1-token response is "middle", a 2-token response is
#: early + late); < 1/3 is early, >= 2/3 is late.
_POSITION_CUTS = (1.0 / 3.0, 2.0 / 3.0)

#: DRPO's delta in the paper (ablation default). The stationary point pi* = mu + sign(A) delta
#: lies outside [0, 1] for delta = 12.5, i.e. the default is PG-IS with a +-8% tilt.
DRPO_DELTA_DEFAULT = 12.5
#: DPPO Binary-TV's default boundary, reported as a fixed reference next to the configured delta
#: so users see how many tokens a DPPO-TV run would mask at the same mismatch.
DPPO_TV_DELTA_DEFAULT = 0.15
#: Ratio band [1/c, c] for the "outside" fraction (a common TIS / IcePop / MIS truncation value).
RATIO_C_DEFAULT = 2.0

_PREFIX = "mismatch/"


# --------------------------------------------------------------------------------------------
# Per-token quantities. All take/return 1-D fp32 tensors [N] over valid tokens.
# --------------------------------------------------------------------------------------------


def token_log_ratio(logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """d_t = log pi_t - log mu_t, shape [N], unclamped.

    ``mismatch/logprob_abs_diff`` = mean_t |d_t| (slime's ``train_rollout_logprob_abs_diff``).
    Healthy: 0 ideal; BF16 dense Qwen3-4B ~ 0.011 (slime); FP8 rollouts and MoE are larger.
    """
    return logp - rollout_logp


def token_is_ratio(d: torch.Tensor) -> torch.Tensor:
    """r_t = exp(clamp(d_t, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) = pi_t / mu_t, shape [N]."""
    return torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def token_mult_prob_error(d: torch.Tensor) -> torch.Tensor:
    """exp(|d_t|) (clamped at e^20), shape [N]; its token mean is ``token_mult_prob_error``.

    NeMo-RL's metric: max(pi/mu, mu/pi) averaged over tokens. Ideal 1.0, investigate > 1.05.
    """
    return torch.exp(d.abs().clamp(max=LOG_RATIO_CLAMP))


def token_k3_kl_rollout_train(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(mu || pi) per token: r_t - 1 - d_t >= 0, shape [N].

    Unbiased for KL(mu(.|s_t) || pi(.|s_t)) because y_t ~ mu (NeMo-RL's ``gen_kl_error``,
    verl's ``rollout_corr/k3_kl``). ~ d^2/2 for small d. Ideal 0.
    """
    dc = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return r - 1.0 - dc


def token_k3_kl_train_rollout(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Importance-weighted k3 estimator of KL(pi || mu) per token: 1 - r_t + r_t d_t >= 0.

    k3 for KL(pi || mu) with samples from pi is (mu/pi) - 1 - log(mu/pi); samples come from mu,
    so it is weighted by r: r (1/r - 1 + d) = 1 - r + r d (NeMo-RL's ``policy_kl_error``
    direction). ~ d^2/2 for small d. Ideal 0. Shape [N].
    """
    dc = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return 1.0 - r + r * dc


def token_js(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-token estimator of the Jensen-Shannon divergence JS(mu, pi), shape [N], >= 0.

    JS = 1/2 KL(mu || m) + 1/2 KL(pi || m), m = (mu + pi)/2. With y_t ~ mu:
    f(r) = 1/2 [ r log r - (1 + r) log((1 + r)/2) ], E_mu[f(r)] = JS(mu(.|s_t), pi(.|s_t)).
    f(1) = 0; ~ d^2/8 for small d; the true JS is bounded by log 2.
    """
    dc = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_half_1p_r = torch.nn.functional.softplus(dc) - math.log(2.0)  # log((1 + r) / 2)
    return 0.5 * (r * dc - (1.0 + r) * log_half_1p_r)


def token_chi2(r: torch.Tensor) -> torch.Tensor:
    """Per-token chi^2 term r_t^2 - 1, shape [N]; mean = chi^2(pi || mu) estimate. Ideal 0."""
    return r * r - 1.0


def drpo_gradient_weight(pi: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
                         advantages: torch.Tensor, delta: float) -> torch.Tensor:
    """DRPO's per-token gradient weight w_t = 1 - sign(A_t (r_t - 1)) |pi_t - mu_t| / delta.

    Shapes [N], dtype of the inputs (the metrics use fp64 so that w - 1 ~ 1e-9 stays visible).
    Ascent direction is A r w grad log pi; w in [1 - 1/delta, 1 + 1/delta]. w < 1 on
    tokens the trust region holds back (pi moved in the direction A pushes), w < 0 means the
    penalty reverses the update (corrective regime; only possible when delta < 1).
    """
    return 1.0 - torch.sign(advantages * (r - 1.0)) * (pi - mu).abs() / delta


# --------------------------------------------------------------------------------------------
# Grouped reductions: per-token values [N] + group ids [N] in [0, G) -> per-group stats [G].
# --------------------------------------------------------------------------------------------


class _Groups:
    """Segment reductions over ``G`` groups; tokens with group id < 0 are excluded."""

    def __init__(self, gid: torch.Tensor, n_groups: int):
        keep = gid >= 0
        self.keep = keep
        self.all_kept = bool(keep.all())
        self.gid = gid[keep].long()
        self.G = n_groups
        self.count = torch.bincount(self.gid, minlength=n_groups).to(torch.float64)

    def _sel(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_kept else x[self.keep]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.G, dtype=torch.float64, device=x.device)
        return out.index_add_(0, self.gid, self._sel(x).to(torch.float64))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.count  # nan for empty groups

    def max(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.G,), -math.inf, dtype=torch.float64, device=x.device)
        return out.scatter_reduce_(0, self.gid, self._sel(x).to(torch.float64), "amax")

    def min(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.G,), math.inf, dtype=torch.float64, device=x.device)
        return out.scatter_reduce_(0, self.gid, self._sel(x).to(torch.float64), "amin")

    def frac(self, cond: torch.Tensor) -> torch.Tensor:
        return self.mean(cond.to(torch.float32))

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """Population std (divide by n), two-pass for accuracy."""
        xs = self._sel(x).to(torch.float64)
        m = self.mean(x)
        c = xs - m[self.gid]
        out = torch.zeros(self.G, dtype=torch.float64, device=x.device)
        return (out.index_add_(0, self.gid, c * c) / self.count).sqrt()

    def pearson(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pearson correlation per group; nan if a group has < 2 tokens or zero variance."""
        xs, ys = self._sel(x).to(torch.float64), self._sel(y).to(torch.float64)
        cx, cy = xs - self.mean(x)[self.gid], ys - self.mean(y)[self.gid]
        z = lambda: torch.zeros(self.G, dtype=torch.float64, device=x.device)  # noqa: E731
        sxy = z().index_add_(0, self.gid, cx * cy)
        sxx = z().index_add_(0, self.gid, cx * cx)
        syy = z().index_add_(0, self.gid, cy * cy)
        den = (sxx * syy).sqrt()
        out = sxy / den
        return torch.where((den > 0) & (self.count >= 2), out, torch.full_like(out, math.nan))


def _token_group_metrics(tok: dict, groups: _Groups, *, ratio_c: float, delta: float,
                         dppo_tv_delta: float) -> dict[str, torch.Tensor]:
    """The token-level metric set, computed for every group at once. Values are [G] fp64."""
    d, absd, r = tok["d"], tok["absd"], tok["r"]
    pdiff_abs = tok["pdiff_abs"]
    out = {
        "logprob_abs_diff": groups.mean(absd),
        "logprob_abs_diff_max": groups.max(absd),
        "logprob_diff_mean": groups.mean(d),
        "token_mult_prob_error": groups.mean(token_mult_prob_error(d)),
        "kl_k1_rollout_train": groups.mean(-d),
        "kl_k3_rollout_train": groups.mean(token_k3_kl_rollout_train(d, r)),
        "kl_k3_train_rollout": groups.mean(token_k3_kl_train_rollout(d, r)),
        "js_divergence": groups.mean(token_js(d, r)),
        "prob_abs_diff_mean": groups.mean(pdiff_abs),
        "prob_abs_diff_max": groups.max(pdiff_abs),
        "prob_abs_diff_std": groups.std(pdiff_abs),
        "prob_pearson": groups.pearson(tok["pi"], tok["mu"]),
        "chi2_token": groups.mean(token_chi2(r)),
        "ratio_outside_frac": groups.frac((r < 1.0 / ratio_c) | (r > ratio_c)),
        "ratio_below_frac": groups.frac(r < 1.0 / ratio_c),
        "ratio_above_frac": groups.frac(r > ratio_c),
        "beyond_delta_frac": groups.frac(pdiff_abs > delta),
        "beyond_dppo_tv_frac": groups.frac(pdiff_abs > dppo_tv_delta),
    }
    s1, s2 = groups.sum(r), groups.sum(r * r)
    out["is_ess"] = (s1 * s1) / (groups.count * s2)
    return out


def _positions(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense sequence index [T], rank within sequence [T], sequence length [T]) from seq ids."""
    T = seq.numel()
    uniq, inv = torch.unique(seq, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv, minlength=uniq.numel())
    starts = torch.cumsum(counts, 0) - counts
    sorted_inv = inv[order]
    rank_sorted = torch.arange(T, device=seq.device) - starts[sorted_inv]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return inv, rank, counts[inv]


def _as_1d(name: str, x: torch.Tensor, T: Optional[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor over packed response tokens, got shape "
                         f"{tuple(x.shape)}")
    if T is not None and x.numel() != T:
        raise ValueError(f"{name} has {x.numel()} tokens, expected {T} (same as logp)")
    return x.detach()


def _prepare(logp, rollout_logp, mask):
    logp = _as_1d("logp", logp, None)
    T = logp.numel()
    rollout_logp = _as_1d("rollout_logp", rollout_logp, T).to(logp.device)
    mask = _as_1d("mask", mask, T).to(logp.device).bool()
    lp = logp.to(torch.float32)
    mu_lp = rollout_logp.to(torch.float32)
    fin_mu, fin_pi = torch.isfinite(mu_lp), torch.isfinite(lp)
    valid = mask & fin_mu & fin_pi
    counts = {
        "tokens": int(valid.sum()),
        "masked_tokens": int(mask.sum()),
        "nonfinite_rollout_tokens": int((mask & ~fin_mu).sum()),
        "nonfinite_train_tokens": int((mask & ~fin_pi).sum()),
    }
    return lp, mu_lp, valid, counts


def _token_quantities(lp_v: torch.Tensor, mu_lp_v: torch.Tensor) -> dict:
    d = token_log_ratio(lp_v, mu_lp_v)
    r = token_is_ratio(d)
    pi, mu = torch.exp(lp_v), torch.exp(mu_lp_v)
    return {"d": d, "absd": d.abs(), "r": r, "pi": pi, "mu": mu, "pdiff": pi - mu,
            "pdiff_abs": (pi - mu).abs()}


def _mu_bin(mu_lp_v: torch.Tensor) -> torch.Tensor:
    edges = torch.tensor([math.log(e) for e in MU_BIN_EDGES], dtype=mu_lp_v.dtype,
                         device=mu_lp_v.device)
    return torch.bucketize(mu_lp_v, edges, right=True)  # [lo, hi) bins, 0..len(edges)


def _to_lists(vals: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """[G] tensors -> python lists with one device->host copy (not one sync per value)."""
    if not vals:
        return {}
    keys = list(vals)
    rows = torch.stack([vals[k].to(torch.float64) for k in keys]).cpu().tolist()
    return dict(zip(keys, rows))


def _emit_groups(res: dict, prefix: str, labels, vals: dict, counts: torch.Tensor,
                 n_total: int) -> None:
    lists = _to_lists(vals)
    for g, (label, n) in enumerate(zip(labels, counts.cpu().tolist())):
        res[f"{_PREFIX}{prefix}/{label}/token_frac"] = n / n_total if n_total else math.nan
        if n == 0:
            continue
        for k, v in lists.items():
            res[f"{_PREFIX}{prefix}/{label}/{k}"] = v[g]


@torch.no_grad()
def compute_mismatch_metrics(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    seq_ids: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    delta: float = DRPO_DELTA_DEFAULT,
    ratio_c: float = RATIO_C_DEFAULT,
    routed_experts_train: Optional[torch.Tensor] = None,
    routed_experts_rollout: Optional[torch.Tensor] = None,
    dppo_tv_delta: float = DPPO_TV_DELTA_DEFAULT,
    routed_layer_ids: Optional[Sequence[int]] = None,
) -> dict[str, float]:
    """All mismatch metrics of one step, as ``{"mismatch/<name>": float}``.

    Args:
        logp: [T] trainer log-probs log pi of the sampled tokens (any float dtype; fp32 math).
        rollout_logp: [T] rollout-engine log-probs log mu of the same tokens.
        mask: [T] bool / 0-1, which tokens count.
        seq_ids: [T] int sequence id per token (enables sequence metrics and the position
            split; positions follow the order of the tokens of each id).
        advantages: [T] per-token advantage (enables DRPO weight stats, DPPO mask fraction and
            the advantage-sign split).
        delta: DRPO / DPPO-TV probability-space boundary (the configured loss delta).
        ratio_c: band [1/c, c] for ``ratio_outside_frac``.
        routed_experts_train / routed_experts_rollout: [T, L, K] (or [T, K]) int expert ids
            chosen by the trainer's and the engine's routers (enables ``mismatch/moe/*``).
        dppo_tv_delta: reference DPPO-TV boundary for ``beyond_dppo_tv_frac`` (0.15).
        routed_layer_ids: [L] the model layer index of each of the L routed layers (names the
            per-layer keys ``moe/layer_<i>/*``; default 0 .. L-1).

    Returns (always present; NaN when no valid token):
        counts ``tokens``, ``masked_tokens``, ``nonfinite_rollout_tokens``,
        ``nonfinite_train_tokens``; the token metric set (``logprob_abs_diff``,
        ``token_mult_prob_error``, k1/k3 KL, JS, |pi-mu| mean/max/std, ``prob_pearson``,
        ``chi2_token``, ``is_ess``, ratio fractions, ``beyond_delta_frac``,
        ``beyond_dppo_tv_frac``); the same set under ``by_mu/<bin>/`` (keys of empty bins
        omitted except ``token_frac``).
        With ``seq_ids``: ``sequences``, ``chi2_seq``, ``is_ess_seq``,
        ``seq_log_ratio_abs_mean``, ``seq_logprob_abs_diff_max``, and ``by_pos/<third>/``.
        With ``advantages``: ``drpo_weight_{min,mean,max,std,neg_frac,below_one_frac}``
        (over tokens with A != 0), ``dppo_masked_frac``, ``adv_zero_frac`` and
        ``by_adv/{pos,neg}/``.
        With routed experts: ``moe/*`` (overall and ``moe/layer_<i>/route_mismatch_frac``,
        ``moe/layer_<i>/expert_overlap`` per layer).
    See :mod:`drpo_megatron.mismatch.catalog` for formulas and healthy ranges.
    """
    if delta <= 0 or ratio_c <= 1.0 or dppo_tv_delta <= 0:
        raise ValueError(f"need delta > 0, dppo_tv_delta > 0 and ratio_c > 1; got delta={delta}, "
                         f"dppo_tv_delta={dppo_tv_delta}, ratio_c={ratio_c}")
    lp, mu_lp, valid, counts = _prepare(logp, rollout_logp, mask)
    T, dev = lp.numel(), lp.device
    res: dict[str, float] = {f"{_PREFIX}{k}": float(v) for k, v in counts.items()}
    N = counts["tokens"]
    tok = _token_quantities(lp[valid], mu_lp[valid])
    kw = dict(ratio_c=ratio_c, delta=delta, dppo_tv_delta=dppo_tv_delta)

    # Overall (one group).
    overall = _Groups(torch.zeros(N, dtype=torch.long, device=dev), 1)
    for k, v in _to_lists(_token_group_metrics(tok, overall, **kw)).items():
        res[f"{_PREFIX}{k}"] = v[0] if N else math.nan

    # By mu decade.
    g = _Groups(_mu_bin(mu_lp[valid]), len(MU_BIN_LABELS))
    _emit_groups(res, "by_mu", MU_BIN_LABELS, _token_group_metrics(tok, g, **kw) if N else {},
                 g.count, N)

    # Sequence-level metrics and the position split.
    if seq_ids is not None:
        seq = _as_1d("seq_ids", seq_ids, T).to(dev).long()
        seq_idx, rank, length = _positions(seq)
        sv = seq_idx[valid]
        n_seq = int(torch.unique(sv).numel()) if N else 0
        res[f"{_PREFIX}sequences"] = float(n_seq)
        if N:
            S = int(seq_idx.max()) + 1
            sg = _Groups(sv, S)
            present = sg.count > 0
            seq_lr = sg.sum(tok["d"])[present]  # sum_t d_t per sequence
            rho = torch.exp(seq_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            res[f"{_PREFIX}chi2_seq"] = float((rho * rho).mean() - 1.0)
            res[f"{_PREFIX}is_ess_seq"] = float(rho.sum() ** 2 / (rho.numel() * (rho * rho).sum()))
            res[f"{_PREFIX}seq_log_ratio_abs_mean"] = float(seq_lr.abs().mean())
            res[f"{_PREFIX}seq_logprob_abs_diff_max"] = float(sg.mean(tok["absd"])[present].max())
        else:
            for k in ("chi2_seq", "is_ess_seq", "seq_log_ratio_abs_mean",
                      "seq_logprob_abs_diff_max"):
                res[f"{_PREFIX}{k}"] = math.nan
        rel = (rank.to(torch.float64) + 0.5) / length.to(torch.float64)
        third = torch.bucketize(rel, torch.tensor(_POSITION_CUTS, dtype=torch.float64,
                                                  device=dev), right=True)
        g = _Groups(third[valid], len(POSITION_LABELS))
        _emit_groups(res, "by_pos", POSITION_LABELS,
                     _token_group_metrics(tok, g, **kw) if N else {}, g.count, N)

    # Advantage-dependent metrics: DRPO weights, DPPO mask, sign split.
    if advantages is not None:
        adv = _as_1d("advantages", advantages, T).to(dev).to(torch.float32)[valid]
        adv = torch.where(torch.isfinite(adv), adv, torch.zeros_like(adv))
        nz = adv != 0
        res[f"{_PREFIX}adv_zero_frac"] = float((~nz).float().mean()) if N else math.nan
        # fp64: with delta = 12.5 and |pi - mu| ~ 1e-8, w - 1 is below fp32 resolution at 1.
        f64 = lambda x: x[nz].to(torch.float64)  # noqa: E731
        w = drpo_gradient_weight(f64(tok["pi"]), f64(tok["mu"]), f64(tok["r"]), f64(adv), delta)
        if w.numel():
            res[f"{_PREFIX}drpo_weight_min"] = float(w.min())
            res[f"{_PREFIX}drpo_weight_mean"] = float(w.mean())
            res[f"{_PREFIX}drpo_weight_max"] = float(w.max())
            res[f"{_PREFIX}drpo_weight_std"] = float(w.std(correction=0))
            res[f"{_PREFIX}drpo_weight_neg_frac"] = float((w < 0).float().mean())
            res[f"{_PREFIX}drpo_weight_below_one_frac"] = float((w < 1).float().mean())
        else:
            for k in ("min", "mean", "max", "std", "neg_frac", "below_one_frac"):
                res[f"{_PREFIX}drpo_weight_{k}"] = math.nan
        dppo_mask = (adv * (tok["r"] - 1.0) > 0) & (tok["pdiff_abs"] > delta)
        res[f"{_PREFIX}dppo_masked_frac"] = float(dppo_mask.float().mean()) if N else math.nan
        sign_gid = torch.where(adv > 0, 0, torch.where(adv < 0, 1, -1))
        g = _Groups(sign_gid, 2)
        _emit_groups(res, "by_adv", ADV_LABELS,
                     _token_group_metrics(tok, g, **kw) if int(g.count.sum()) else {},
                     g.count, N)

    # MoE routing disagreement.
    if (routed_experts_train is None) != (routed_experts_rollout is None):
        raise ValueError("routed_experts_train and routed_experts_rollout must be given together")
    if routed_experts_train is not None:
        res.update(_routing_metrics(routed_experts_train, routed_experts_rollout, valid,
                                    tok["absd"], layer_ids=routed_layer_ids))
    return res


def _routing_metrics(rt: torch.Tensor, rr: torch.Tensor, valid: torch.Tensor,
                     absd: torch.Tensor, layer_ids: Optional[Sequence[int]] = None
                     ) -> dict[str, float]:
    """Routing disagreement between the trainer's and the engine's top-K expert sets.

    ``rt``/``rr``: [T, L, K] (or [T, K] = one layer) int expert ids; order within the K slots
    does not matter. Over valid tokens and all layers:
      route_mismatch_frac   = mean_{t,l} 1[S_train(t,l) != S_rollout(t,l)]
      expert_overlap        = mean_{t,l} |S_train ∩ S_rollout| / K     (1 = identical)
      token_mismatch_frac   = mean_t 1[any layer differs]
      layer_mismatch_frac_max / worst_layer = the layer with the highest mismatch fraction
      logprob_abs_diff_route_same / _route_diff = mean |d| over tokens whose routing fully
          agrees / differs in at least one layer (ties routing to log-prob mismatch).
    Per layer l (``layer_ids[l]``, default l): ``layer_<id>/route_mismatch_frac`` and
    ``layer_<id>/expert_overlap``; ``worst_layer`` is that id.
    """
    rt = torch.as_tensor(rt).detach()
    rr = torch.as_tensor(rr).detach().to(rt.device)
    if rt.dim() == 2:
        rt, rr = rt.unsqueeze(1), rr.unsqueeze(1)
    if rt.shape != rr.shape or rt.dim() != 3 or rt.shape[0] != valid.numel():
        raise ValueError(f"routed experts must both be [T, L, K] (or [T, K]) with T="
                         f"{valid.numel()}; got {tuple(rt.shape)} and {tuple(rr.shape)}")
    ids = list(range(rt.shape[1])) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != rt.shape[1]:
        raise ValueError(f"routed_layer_ids has {len(ids)} entries for {rt.shape[1]} layers")
    v = valid.to(rt.device)
    a, b = rt[v].long(), rr[v].long()  # [N, L, K]
    p = "mismatch/moe/"
    if a.shape[0] == 0:
        return {p + k: math.nan for k in ("route_mismatch_frac", "expert_overlap",
                                          "token_mismatch_frac", "layer_mismatch_frac_max")}
    K = a.shape[-1]
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)  # [N, L]
    differs = overlap < K
    per_layer = differs.float().mean(0)  # [L]
    overlap_layer = (overlap.float() / K).mean(0)  # [L]
    tok_diff = differs.any(-1)  # [N]
    res = {
        p + "route_mismatch_frac": float(differs.float().mean()),
        p + "expert_overlap": float((overlap.float() / K).mean()),
        p + "token_mismatch_frac": float(tok_diff.float().mean()),
        p + "layer_mismatch_frac_max": float(per_layer.max()),
        p + "worst_layer": float(ids[int(per_layer.argmax())]),
    }
    for j, layer in enumerate(ids):
        res[f"{p}layer_{layer}/route_mismatch_frac"] = float(per_layer[j])
        res[f"{p}layer_{layer}/expert_overlap"] = float(overlap_layer[j])
    absd = absd.to(a.device)
    same = ~tok_diff
    if bool(same.any()):
        res[p + "logprob_abs_diff_route_same"] = float(absd[same].to(torch.float64).mean())
    if bool(tok_diff.any()):
        res[p + "logprob_abs_diff_route_diff"] = float(absd[tok_diff].to(torch.float64).mean())
    return res


@torch.no_grad()
def mismatch_histogram_tensors(
    logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    advantages: Optional[torch.Tensor] = None,
    delta: float = DRPO_DELTA_DEFAULT,
) -> dict[str, torch.Tensor]:
    """Per-token arrays (1-D fp32, valid tokens only, same device) for histogram writers.

    Keys: ``mismatch/logprob_diff`` (d), ``mismatch/logprob_abs_diff`` (|d|),
    ``mismatch/prob_diff`` (pi - mu), ``mismatch/prob_abs_diff``, ``mismatch/is_ratio`` (r,
    clamped), ``mismatch/rollout_logprob`` (log mu), and with ``advantages``
    ``mismatch/drpo_weight`` (w over tokens with A != 0). Pass the dict to
    ``MetricWriter.log_histograms``.
    """
    lp, mu_lp, valid, _ = _prepare(logp, rollout_logp, mask)
    tok = _token_quantities(lp[valid], mu_lp[valid])
    out = {
        "mismatch/logprob_diff": tok["d"],
        "mismatch/logprob_abs_diff": tok["absd"],
        "mismatch/prob_diff": tok["pdiff"],
        "mismatch/prob_abs_diff": tok["pdiff_abs"],
        "mismatch/is_ratio": tok["r"],
        "mismatch/rollout_logprob": mu_lp[valid],
    }
    if advantages is not None:
        adv = _as_1d("advantages", advantages, lp.numel()).to(lp.device).to(torch.float32)[valid]
        adv = torch.where(torch.isfinite(adv), adv, torch.zeros_like(adv))
        nz = adv != 0
        out["mismatch/drpo_weight"] = drpo_gradient_weight(tok["pi"], tok["mu"], tok["r"], adv,
                                                           delta)[nz]
    return out
