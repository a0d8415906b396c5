r"""Per-token policy losses: DRPO and its baselines, each as its paper defines it.

Contract shared by every function in :data:`POLICY_LOSSES`::

    per_token_loss, metrics = fn(logp, rollout_logp, advantages, mask, cfg=None, **extra)

Inputs (same shape, normally [T] = all response tokens of a micro-batch, packed):
  logp          log pi_theta(y_t | s_t) of the sampled token, differentiable, any float dtype.
  rollout_logp  log mu(y_t | s_t) of the anchor, treated as a constant (detached). This is the
                rollout engine's log-prob by default; with ``cfg.anchor == "old_policy"`` the
                trainer passes recomputed pi_old log-probs here instead
                (:func:`~drpo_megatron.algorithms.config.select_anchor_logp`). The loss itself
                never switches anchors.
  advantages    A_t, constant (the sequence advantage broadcast to its tokens).
  mask          bool or 0/1, true on the tokens that enter the loss.
  cfg           the loss's config dataclass (``LOSS_CONFIGS[name]``), a mapping of its fields, or
                None for the defaults.
  extra         loss-specific tensors (see :data:`LOSS_EXTRAS`); unknown extras are ignored, so
                a trainer may pass the same extras to every loss.

Output:
  per_token_loss  fp32 (fp64 for fp64 inputs), same shape, = -objective_t on valid tokens and exactly 0 elsewhere
                  (masked tokens, and tokens whose anchor log-prob or advantage is non-finite:
                  those are dropped and counted in ``loss/dropped_nonfinite``). Reduce it with
                  :func:`~drpo_megatron.algorithms.aggregation.aggregate_loss`.
  metrics         dict of detached 0-dim fp32 tensors under ``loss/`` (contract in ``_common``).

Every computation runs in fp32 (inputs are cast up; fp64 inputs stay fp64), with
r = exp(clamp(log pi - log mu, +-20)); mu and A are constants. With objective J_t, the gradient of
the per-token loss is

    d loss_t / d logp_t = -A_t * r_t * w_t   (0 for tokens beyond the +-20 log-ratio clamp),

where w_t is the loss's *gradient weight* (table in docs/losses.md); each docstring states it.
Implementation: each loss computes its objective value J_t and its weight w_t as constants, and
the returned per-token loss carries the value -J_t and exactly that gradient through a one-multiply
autograd node (``_common._PolicySurrogate``). This is the paper's definition of each method by its
gradient weight, costs one saved tensor instead of an autograd graph, and keeps DRPO within 1.3x
of PG-IS (bench/bench_losses.py). The tests check the autograd gradient against an independent
reference of w_t and the value against finite differences, golden numbers and the DRPO maximiser.

Metrics of every loss: ``loss/num_tokens``, ``loss/dropped_nonfinite``,
``loss/ratio_{mean,min,max}``, ``loss/prob_diff_gt_delta_frac`` (|pi - mu| > cfg.monitor_delta),
``loss/weight_{mean,min,max}`` and ``loss/weight_neg_frac`` (the closed-form w, e.g. DRPO's
weight). Losses that clip or mask add ``loss/clipfrac_adv_pos`` / ``loss/clipfrac_adv_neg``
(fraction of *all* valid tokens that are clipped/masked and have A > 0 / A < 0); regularized
losses add ``loss/regularizer`` (mean penalty).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._common import LOG_RATIO_CLAMP, TokenBatch, dense_seq_index
from .config import resolve_loss_config

# Probabilities inside the logs of the KL masks are floored at the dtype's smallest normal number
# (log = -87.3 in fp32), so a vanishing bucket of the current policy reads as a very large, finite
# divergence. An infinite divergence is reported as _DIV_CAP in loss/divergence_{mean,max}.
_DIV_CAP = 1e30


def _moves_away(b: TokenBatch) -> torch.Tensor:
    """A*(r-1) > 0: the gradient step pushes pi further from mu (DPPO's masking direction)."""
    return (b.adv * b.log_ratio) > 0


# ------------------------------------------------------------------------------------------------
# Unregularized and clipped
# ------------------------------------------------------------------------------------------------
def pg_is(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""PG-IS, the unregularized importance-sampled policy gradient.

    Objective J_t = r_t * A_t.  Gradient weight w_t = 1.  Config: :class:`PGISConfig` (no
    parameters). Shapes/masking: module docstring.
    """
    cfg = resolve_loss_config("pg_is", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        objective = b.ratio_adv
    return b.finish(objective, cfg)


def ppo_clip(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""PPO / GRPO clipped surrogate with asymmetric clip range and optional dual clip.

    J_t = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); with dual clip c (A < 0 only):
    J_t = max(J_t, c A).
    w_t = 0 where the clipped branch is active (A > 0 and r > 1 + eps_high; A < 0 and
    r < 1 - eps_low; dual clip: A < 0 and r > c), else 1.
    Defaults (:class:`PPOClipConfig`): eps_low 0.2, eps_high 0.28, dual clip off.
    Extra metric: ``loss/dual_clipfrac`` (fraction of valid tokens cut by the dual clip).
    """
    cfg = resolve_loss_config("ppo_clip", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        r, a = b.ratio, b.adv
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        objective = torch.minimum(b.ratio_adv, r.clamp(lo, hi) * a)
        cut = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
        extra_m = {}
        if cfg.dual_clip_c is not None:
            floor = cfg.dual_clip_c * a
            dual = (a < 0) & (objective < floor)
            objective = torch.where(dual, floor, objective)
            cut = cut | dual
            extra_m["loss/dual_clipfrac"] = b.frac(dual)
        weight = (~cut).to(r.dtype)
    return b.finish(objective, cfg, weight=weight, weight_can_be_negative=False, clipped=cut,
                    extra_metrics=extra_m)


def cispo(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""CISPO / PG-TIS: policy gradient with a truncated, stop-gradient IS weight.

    J_t = sg(min(r, c)) * A * log pi.  Gradient A * min(r, c), i.e. w_t = min(r, c) / r: every
    token keeps a gradient (unlike PPO), only its weight is capped.
    The loss *value* is a surrogate (it contains log pi); only its gradient is meaningful.
    Default (:class:`CISPOConfig`): c = 5.0. ``loss/clipfrac_*`` counts tokens with r > c.
    """
    cfg = resolve_loss_config("cispo", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        is_weight = b.ratio.clamp(max=cfg.c)
        objective = is_weight * b.adv * b.logp
        clipped = b.ratio > cfg.c
        weight = is_weight / b.ratio
    return b.finish(objective, cfg, weight=weight, weight_neutral=cfg.c >= 1.0,
                    weight_can_be_negative=False, clipped=clipped)


def gspo(logp, rollout_logp, advantages, mask, cfg=None, *, seq_ids=None, **extra):
    r"""GSPO: sequence-level, length-normalised ratio, clipped per sequence (GSPO-token form).

    s_i = exp(mean_{t in i, valid} clamp(log pi_t - log mu_t, +-20)) (clamped to +-20 again);
    per token s_{i,t} = sg(s_i) * pi_t / sg(pi_t) (value s_i, d s_{i,t}/d logp_t = s_i);
    J_t = min(s_{i,t} A_t, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_t).
    Gradient d loss_t / d logp_t = -A_t * s_i * w_t with w_t = w_i in {0, 1} for the whole
    sequence (0 iff A > 0 and s_i > 1 + eps_high, or A < 0 and s_i < 1 - eps_low); "r" in the
    shared formula is the sequence ratio s_i. With ``seq-mean-token-mean`` aggregation and a
    constant advantage per sequence this is exactly GSPO's sequence objective gradient.

    Needs ``seq_ids`` (int tensor shaped like ``logp``: the sequence each token belongs to; a
    sequence's tokens must all be in this call). Defaults (:class:`GSPOConfig`): eps_low 3e-4,
    eps_high 4e-4. Extra metrics ``loss/seq_ratio_{mean,min,max}`` (token-weighted).
    """
    cfg = resolve_loss_config("gspo", cfg)
    if seq_ids is None:
        raise ValueError("loss 'gspo' needs extra seq_ids (int tensor shaped like logp, the "
                         "sequence index of every token). Fix: pass seq_ids=... to the loss")
    if seq_ids.shape != logp.shape or seq_ids.is_floating_point():
        raise ValueError(f"gspo: seq_ids must be an integer tensor of shape {tuple(logp.shape)}, "
                         f"got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        inv, n_seq = dense_seq_index(seq_ids)
        dt = b.ratio.dtype
        sums = torch.zeros(n_seq, dtype=dt, device=inv.device).index_add_(
            0, inv, b.log_ratio.reshape(-1))  # log_ratio is 0 on invalid tokens
        cnts = torch.zeros(n_seq, dtype=dt, device=inv.device).index_add_(
            0, inv, b.valid_f.reshape(-1))
        seq_lr = (sums / cnts.clamp(min=1)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        s = torch.exp(seq_lr)[inv].reshape(logp.shape)
        a = b.adv
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        objective = torch.minimum(s * a, s.clamp(lo, hi) * a)
        clipped = ((a > 0) & (s > hi)) | ((a < 0) & (s < lo))
        weight = (~clipped).to(dt)
        extra_m = b.stats("loss/seq_ratio", s)
    return b.finish(objective, cfg, weight=weight, grad_ratio=s, weight_can_be_negative=False,
                    clipped=clipped, extra_metrics=extra_m)


# ------------------------------------------------------------------------------------------------
# Quadratic trust-region penalties: SPO and DRPO
# ------------------------------------------------------------------------------------------------
def spo(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""SPO: J_t = r A - |A| / (2 eps) * (r - 1)^2  (a chi^2 penalty in ratio space).

    w_t = 1 - sign(A (r - 1)) |r - 1| / eps, unbounded as r grows (hypersensitive to low-mu
    tokens, where small probability moves are large ratio moves). Stationary point r* = 1 +
    sign(A) eps. Default (:class:`SPOConfig`): eps 12.5 (the DRPO paper's SPO baseline).
    """
    cfg = resolve_loss_config("spo", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    return _quadratic(b, cfg, cfg.epsilon, mu_weighting=False)


def drpo(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""DRPO: J_t = r A - |A| / (2 delta) * mu * (r - 1)^2.

    Since mu (r - 1) = pi - mu, the penalty is an advantage-weighted squared shift in probability
    space, |A| (pi - mu)^2 / (2 delta mu): SPO with a per-token eps_t = delta / mu_t.
    w_t = 1 - sign(A (r - 1)) |pi - mu| / delta, which lies in [1 - 1/delta, 1 + 1/delta]; the
    per-token objective is maximised at pi* = mu + sign(A) delta (DPPO-TV's boundary).
    With the default delta = 12.5 (:class:`DRPOConfig`) w spans [0.92, 1.08] and pi* is outside
    [0, 1]: PG-IS with a smooth +-8% tilt. Small delta (e.g. 0.15) gives a real trust region.
    ``mu_weighting=False`` drops the mu factor and yields SPO with eps = delta.
    ``loss/weight_*`` are the DRPO weights; ``loss/weight_neg_frac`` the corrective fraction
    (w < 0 needs |pi - mu| > delta, so it is 0 by construction for delta >= 1).
    """
    cfg = resolve_loss_config("drpo", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    return _quadratic(b, cfg, cfg.delta, mu_weighting=cfg.mu_weighting)


def _addcmul(base: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float) -> torch.Tensor:
    """``base + value * t1 * t2`` in one fused pass; a ``value`` beyond the dtype's range (a
    delta / epsilon near 0, e.g. 1e-45) gives +-inf instead of torch's overflow error, so the
    step is skipped as non-finite (training/actor.py) rather than crashing."""
    if abs(value) <= torch.finfo(base.dtype).max:
        return torch.addcmul(base, t1, t2, value=value)
    return base + t1 * t2 * torch.tensor(value, dtype=base.dtype)


def _quadratic(b: TokenBatch, cfg, scale: float, mu_weighting: bool):
    """J = r A - |A| m (r - 1)^2 / (2 scale), w = 1 - sign(A) m (r - 1) / scale (m = mu or 1).

    With q = sign(A) m (r - 1): w = 1 - q / scale, the penalty is A q (r - 1) / (2 scale) and the
    gradient coefficient A r w = r A - r A q / scale; weight statistics follow from those of q.
    Written as a few fused passes: at 1M tokens the losses are memory-bound.
    """
    with torch.no_grad():
        d = b.ratio_m1
        shift = b.prob_diff if mu_weighting else d  # m (r - 1): pi - mu, or r - 1
        q = torch.sign(b.adv).mul_(shift)  # 0 on invalid tokens
        aq = b.adv * q  # |A| m (r - 1)
        objective = _addcmul(b.ratio_adv, aq, d, -0.5 / scale)
        grad_coef = _addcmul(b.ratio_adv, b.ratio_adv, q, -1.0 / scale)
        reg_sum = torch.dot(aq.reshape(-1), d.reshape(-1)) * (0.5 / scale)
        q_mean = b.mean(q)
        q_lo, q_hi = b.minmax(q, q_mean, neutral=0.0)
        # |pi - mu| <= 1: with mu-weighting w >= 1 - 1/delta, which is >= 0 when delta >= 1
        if mu_weighting and scale >= 1.0:
            neg_frac = torch.zeros_like(q_mean)
        else:
            neg_frac = b.frac_gt(q, scale)  # w < 0 iff q > scale
        weight_stats = {"loss/weight_mean": 1.0 - q_mean / scale,
                        "loss/weight_min": 1.0 - q_hi / scale,
                        "loss/weight_max": 1.0 - q_lo / scale,
                        "loss/weight_neg_frac": neg_frac}
    return b.finish(objective, cfg, grad_coef=grad_coef, weight_stats=weight_stats,
                    regularizer_sum=reg_sum)


def mask_drpo(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""Mask-DRPO (ablation): DRPO's penalty applied only outside DPPO-TV's trust region.

    O_t = 1 iff A (r - 1) > 0 and |pi - mu| > mask_delta (the tokens DPPO-TV would mask);
    J_t = r A - O_t |A| / (2 delta) mu (r - 1)^2;  w_t = 1 - O_t |pi - mu| / delta.
    Defaults (:class:`MaskDRPOConfig`): delta 12.5, mask_delta 0.15. ``loss/clipfrac_*`` is the
    fraction of penalized tokens.
    """
    cfg = resolve_loss_config("mask_drpo", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        dist = b.prob_diff.abs()
        outside = _moves_away(b) & (dist > cfg.mask_delta)
        out_f = outside.to(dist.dtype)
        # on penalized tokens sign(A (r - 1)) = 1: mu (r - 1)^2 = |pi - mu| |r - 1|
        penalty = (b.adv.abs() * dist).mul_((b.ratio - 1.0).abs()).mul_(out_f).mul_(
            0.5 / cfg.delta)
        objective = b.ratio_adv - penalty
        weight = (out_f * dist).mul_(-1.0 / cfg.delta).add_(1.0)
    return b.finish(objective, cfg, weight=weight, weight_can_be_negative=cfg.delta < 1.0,
                    clipped=outside, regularizer=penalty)


# ------------------------------------------------------------------------------------------------
# DPPO: binary and top-K divergence masks
# ------------------------------------------------------------------------------------------------
def _masked_pg(b: TokenBatch, cfg, divergence: torch.Tensor, delta: float):
    """J = M r A with M = 0 iff A (r - 1) > 0 and divergence > delta (M is a constant)."""
    with torch.no_grad():
        masked = _moves_away(b) & (divergence > delta)
        keep = (~masked).to(b.ratio.dtype)
        div = torch.nan_to_num(divergence, nan=0.0, posinf=_DIV_CAP)
        extra_m = b.stats("loss/divergence", div)
        del extra_m["loss/divergence_min"]
        objective = keep * b.ratio_adv
    return b.finish(objective, cfg, weight=keep, weight_can_be_negative=False, clipped=masked,
                    extra_metrics=extra_m)


def _log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate near 0 and near -inf."""
    return torch.log(-torch.expm1(logp.clamp(max=0.0)))


def _kl_term(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with the 0 * log 0 = 0 convention."""
    return torch.where(p > 0, p * (logp - logq), 0.0)


def dppo_tv(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""DPPO Binary-TV: J_t = M_t r A, M_t = 0 iff A (r - 1) > 0 and |pi - mu| > delta.

    |pi - mu| is the total variation between the binary distributions {y_t, not y_t} of pi and mu.
    A token is masked only when the update moves pi away from mu beyond delta; A = 0 and moves
    back towards mu are never masked. w_t = M_t. Default (:class:`DPPOTVConfig`): delta 0.15.
    Extra metrics ``loss/divergence_{mean,max}``.
    """
    cfg = resolve_loss_config("dppo_tv", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        div = b.prob_diff.abs()
    return _masked_pg(b, cfg, div, cfg.delta)


def dppo_kl(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""DPPO Binary-KL: as :func:`dppo_tv` with the binary KL(mu || pi) as divergence:

    D_t = mu log(mu / pi) + (1 - mu) log((1 - mu) / (1 - pi)).  w_t = M_t.
    Default (:class:`DPPOKLConfig`): delta 0.05.
    """
    cfg = resolve_loss_config("dppo_kl", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    with torch.no_grad():
        lmu = b.anchor
        lpi = lmu + b.log_ratio
        floor = math.log(torch.finfo(lmu.dtype).tiny)
        div = (_kl_term(b.mu, lmu, lpi)
               + _kl_term(1.0 - b.mu, _log1m_exp(lmu), _log1m_exp(lpi).clamp(min=floor)))
    return _masked_pg(b, cfg, div, cfg.delta)


def _topk_inputs(name: str, logp: torch.Tensor, extra: dict):
    """Validate the top-K extras; returns (mu_k_logp, pi_k_logp, sampled_in_topk, finite)."""
    missing = [k for k in ("topk_logp", "topk_logp_policy") if extra.get(k) is None]
    has_flag = extra.get("sampled_in_topk") is not None
    has_ids = extra.get("topk_ids") is not None and extra.get("token_ids") is not None
    if missing or not (has_flag or has_ids):
        if not (has_flag or has_ids):
            missing.append("sampled_in_topk (or topk_ids + token_ids)")
        raise ValueError(
            f"loss {name!r} needs extras {missing}: topk_logp [T, K] = the anchor's log-probs of "
            "its top-K token ids (from the rollout engine), topk_logp_policy [T, K] = the current "
            "policy's log-probs at the same ids, sampled_in_topk [T] bool = whether y_t is among "
            "them. Fix: request top-K log-probs from the engine, or use dppo_tv / dppo_kl")
    mu_k = extra["topk_logp"].detach()
    pi_k = extra["topk_logp_policy"].detach()
    if mu_k.shape != pi_k.shape or mu_k.shape[:-1] != logp.shape:
        raise ValueError(f"{name}: topk_logp {tuple(mu_k.shape)} and topk_logp_policy "
                         f"{tuple(pi_k.shape)} must both be {tuple(logp.shape)} + (K,)")
    if has_flag:
        in_topk = extra["sampled_in_topk"].detach()
        in_topk = in_topk if in_topk.dtype == torch.bool else in_topk != 0
    else:
        in_topk = (extra["topk_ids"] == extra["token_ids"].unsqueeze(-1)).any(-1)
    if in_topk.shape != logp.shape:
        raise ValueError(f"{name}: sampled_in_topk must have shape {tuple(logp.shape)}")
    # -inf is a legitimate log-prob (probability 0); NaN and +inf are corrupt: drop the token.
    finite = ~(torch.isnan(mu_k) | torch.isnan(pi_k) | (mu_k == float("inf"))
               | (pi_k == float("inf"))).any(-1)
    return mu_k, pi_k, in_topk, finite


# Rows per chunk of the top-K divergence: its [rows, K] temporaries stay at a few MB at any T.
_TOPK_CHUNK_ROWS = 1 << 16


def _topk_divergence(b: TokenBatch, mu_k_lp, pi_k_lp, in_topk, kind: str) -> torch.Tensor:
    """TV or KL(mu||pi) over buckets: the anchor's top-K ids, y_t if not among them, and "other".

    Computed in row chunks (no gradient). Values on invalid rows are meaningless but never used:
    the DPPO mask needs A != 0, and the metrics ignore invalid rows.
    """
    dt = b.ratio.dtype
    tiny = torch.finfo(dt).tiny
    log_tiny = math.log(tiny)
    mu_s_all = b.mu * (~in_topk).to(dt)  # sampled-token bucket, present only if not in top-K
    out = torch.empty(b.ratio.shape, dtype=dt, device=b.ratio.device)
    flat_out, flat_mu_s = out.view(-1), mu_s_all.reshape(-1)
    flat_r, flat_lr = b.ratio.reshape(-1), b.log_ratio.reshape(-1)
    k = mu_k_lp.shape[-1]
    mu_k_lp, pi_k_lp = mu_k_lp.reshape(-1, k), pi_k_lp.reshape(-1, k)
    for i in range(0, flat_out.numel(), _TOPK_CHUNK_ROWS):
        sl = slice(i, i + _TOPK_CHUNK_ROWS)
        # clamping log-probs at log(tiny) keeps 0 * log 0 terms at (tiny) * finite = ~0
        lmu = mu_k_lp[sl].to(dt).clamp(min=log_tiny)
        lpi = pi_k_lp[sl].to(dt).clamp(min=log_tiny)
        mu_k, pi_k = torch.exp(lmu), torch.exp(lpi)
        mu_s = flat_mu_s[sl]
        pi_s = mu_s * flat_r[sl]
        mu_o = (1.0 - mu_k.sum(-1) - mu_s).clamp_(min=0.0)
        pi_o = (1.0 - pi_k.sum(-1) - pi_s).clamp_(min=0.0)
        if kind == "tv":
            d = (pi_k - mu_k).abs_().sum(-1)
            flat_out[sl] = 0.5 * (d + (pi_s - mu_s).abs() + (pi_o - mu_o).abs())
        else:
            kl_k = (mu_k * (lmu - lpi)).sum(-1)
            kl_s = mu_s * (-flat_lr[sl])  # mu_s (log mu - log pi), 0 when y_t is in the top-K
            kl_o = _kl_term(mu_o, torch.log(mu_o.clamp(min=tiny)), torch.log(pi_o.clamp(min=tiny)))
            flat_out[sl] = kl_k + kl_s + kl_o
    return out


def _dppo_topk(name: str, kind: str, logp, rollout_logp, advantages, mask, cfg, extra):
    cfg = resolve_loss_config(name, cfg)
    mu_k, pi_k, in_topk, finite = _topk_inputs(name, logp, extra)
    b = TokenBatch(logp, rollout_logp, advantages, mask, extra_finite=finite)
    with torch.no_grad():
        div = _topk_divergence(b, mu_k, pi_k, in_topk, kind)
    return _masked_pg(b, cfg, div, cfg.delta)


def dppo_topk_tv(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""DPPO Top-K TV: DPPO's mask with TV over the anchor's top-K tokens.

    Buckets: the K token ids the anchor's engine returned (probabilities exp(topk_logp) for mu,
    exp(topk_logp_policy) for pi), the sampled token y_t when it is not among them (mu, pi from
    ``rollout_logp`` / ``logp``), and an "other" bucket with the remaining mass.
    D_t = 1/2 sum_b |pi_b - mu_b|; M_t = 0 iff A (r - 1) > 0 and D_t > delta; w_t = M_t.

    Extras: ``topk_logp`` [T, K], ``topk_logp_policy`` [T, K] (constants; the mask carries no
    gradient), and ``sampled_in_topk`` [T] bool, or ``topk_ids`` [T, K] + ``token_ids`` [T] to
    derive it. A token whose top-K values are NaN/+inf is dropped and counted (-inf = prob 0).
    Defaults (:class:`DPPOTopKTVConfig`): delta 0.15, top_k 20.
    """
    return _dppo_topk("dppo_topk_tv", "tv", logp, rollout_logp, advantages, mask, cfg, extra)


def dppo_topk_kl(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""DPPO Top-K KL: as :func:`dppo_topk_tv` with D_t = sum_b mu_b log(mu_b / pi_b).

    M_t = 0 iff A (r - 1) > 0 and D_t > delta; w_t = M_t. Same extras as :func:`dppo_topk_tv`.

    Defaults (:class:`DPPOTopKKLConfig`): delta 0.05, top_k 20.
    """
    return _dppo_topk("dppo_topk_kl", "kl", logp, rollout_logp, advantages, mask, cfg, extra)


# ------------------------------------------------------------------------------------------------
# Appendix-C penalty variants: J = r A - |A| / delta * phi(r)
# ------------------------------------------------------------------------------------------------
def _phi_penalty(b: TokenBatch, cfg, phi: torch.Tensor, dphi_dr: torch.Tensor):
    """J = r A - |A|/delta phi(r); w = 1 - sign(A) phi'(r) / delta."""
    with torch.no_grad():
        penalty = b.adv.abs().mul_(phi).mul_(1.0 / cfg.delta)
        objective = b.ratio_adv - penalty
        weight = torch.sign(b.adv).mul_(dphi_dr).mul_(-1.0 / cfg.delta).add_(1.0)
    return b.finish(objective, cfg, weight=weight, regularizer=penalty)


def kl_penalty(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""KL penalty (App. C): J_t = r A - |A| / delta * phi(r).

    direction "forward" (default): phi = -log r (E_mu[-log r] = KL(mu||pi)),
    w_t = 1 + sign(A) / (delta r).
    direction "reverse": phi = r log r (E_mu[r log r] = KL(pi||mu)),
    w_t = 1 - sign(A) (1 + log r) / delta.
    Defaults (:class:`KLPenaltyConfig`): delta 12.5, direction forward.
    """
    cfg = resolve_loss_config("kl_penalty", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    lr, r = b.log_ratio, b.ratio
    if cfg.direction == "forward":
        return _phi_penalty(b, cfg, -lr, -1.0 / r)
    return _phi_penalty(b, cfg, r * lr, 1.0 + lr)


def k3_penalty(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""K3 penalty (App. C): phi = r - 1 - log r >= 0 (k3 estimate of KL(mu||pi)).

    w_t = 1 - sign(A) (1 - 1/r) / delta. Default (:class:`K3PenaltyConfig`): delta 12.5.
    """
    cfg = resolve_loss_config("k3_penalty", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    lr, r = b.log_ratio, b.ratio
    return _phi_penalty(b, cfg, r - 1.0 - lr, 1.0 - 1.0 / r)


def tv_penalty(logp, rollout_logp, advantages, mask, cfg=None, **extra):
    r"""TV penalty (App. C): phi = |r - 1| (E_mu|r - 1| = 2 TV(pi, mu)).

    Binary weight w_t = 1 - sign(A (r - 1)) / delta (w = 1 at r = 1 exactly, the subgradient 0).
    Default (:class:`TVPenaltyConfig`): delta 12.5.
    """
    cfg = resolve_loss_config("tv_penalty", cfg)
    b = TokenBatch(logp, rollout_logp, advantages, mask)
    d = b.ratio - 1.0
    return _phi_penalty(b, cfg, d.abs(), torch.sign(d))


PolicyLoss = Callable[..., tuple]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "pg_is": pg_is,
    "ppo_clip": ppo_clip,
    "cispo": cispo,
    "gspo": gspo,
    "spo": spo,
    "dppo_tv": dppo_tv,
    "dppo_kl": dppo_kl,
    "dppo_topk_tv": dppo_topk_tv,
    "dppo_topk_kl": dppo_topk_kl,
    "drpo": drpo,
    "mask_drpo": mask_drpo,
    "kl_penalty": kl_penalty,
    "k3_penalty": k3_penalty,
    "tv_penalty": tv_penalty,
}

# Extras each loss requires (the trainer computes these only when the chosen loss needs them).
# Top-K losses accept ("topk_ids", "token_ids") instead of "sampled_in_topk".
LOSS_EXTRAS: dict[str, tuple[str, ...]] = {name: () for name in POLICY_LOSSES}
LOSS_EXTRAS["gspo"] = ("seq_ids",)
LOSS_EXTRAS["dppo_topk_tv"] = ("topk_logp", "topk_logp_policy", "sampled_in_topk")
LOSS_EXTRAS["dppo_topk_kl"] = ("topk_logp", "topk_logp_policy", "sampled_in_topk")


def get_policy_loss(name: str) -> PolicyLoss:
    """Return ``POLICY_LOSSES[name]``; ValueError listing the names and a close match if unknown."""
    if name not in POLICY_LOSSES:
        import difflib
        close = difflib.get_close_matches(name, POLICY_LOSSES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown policy loss {name!r}: {hint}Fix: choose one of "
                         f"{sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]
