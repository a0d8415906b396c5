"""Shared plumbing of the policy losses: input sanitation, the ratio, and the metrics contract.

Metrics contract (every loss and correction): a dict of detached 0-dim fp32 tensors.
- ``*/num_tokens`` and ``*dropped_nonfinite``: counts over this call; reduce by sum.
- keys ending in ``_min`` / ``_max``: reduce by min / max (an empty call reports +inf / -inf).
- every other key: a mean over the valid tokens of this call; reduce by a mean weighted by the
  call's count (``loss/num_tokens`` for ``loss/*``, ``mismatch/is_num_tokens`` for
  ``mismatch/is_*``). :func:`reduce_metrics` does exactly this for a list of dicts (e.g. the
  micro-batches of a step, or all-gathered dicts of the data-parallel ranks).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

# Log-ratio clamp before exp: exp(20) ~ 4.9e8 is already far outside any trust region, and it keeps
# r, r^2 and r*log r finite in fp32 (exp overflows at ~88.7). Both reference implementations clamp
# at +-20. Tokens beyond the clamp get zero gradient through r.
LOG_RATIO_CLAMP = 20.0

_INF = float("inf")


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def dense_seq_index(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer sequence ids to (index in [0, n), n), flattened.

    Ids that span a small range (e.g. 0..B-1 or a contiguous block of global ids) are offset by
    their minimum (no sort); sparse ids fall back to ``torch.unique``. Empty sequences in the
    range only add empty bins, which every caller ignores.
    """
    flat = seq_ids.reshape(-1)
    if flat.numel() == 0:
        return flat.long(), 0
    lo, hi = torch.aminmax(flat)
    lo, hi = int(lo), int(hi)
    if hi - lo < 4 * flat.numel() + 1024:
        return (flat - lo).long(), hi - lo + 1
    _, inv = torch.unique(flat, return_inverse=True)
    return inv, int(inv.max()) + 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses compute in: fp32, or fp64 for fp64 inputs (never below fp32)."""
    return torch.promote_types(dtype, torch.float32)


class _PolicySurrogate(torch.autograd.Function):
    """Per-token loss whose value is ``loss_value`` and whose gradient w.r.t. ``logp`` is
    ``grad_coef`` (both constants): the closed-form derivative of the loss's objective, injected
    with one multiply in the backward pass and one saved tensor."""

    @staticmethod
    def forward(ctx, logp, loss_value, grad_coef):  # noqa: D102
        ctx.save_for_backward(grad_coef)
        return loss_value

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (coef,) = ctx.saved_tensors
        return grad * coef, None, None


class TokenBatch:
    """Sanitized view of one call's per-token inputs, and the loss/metrics builder.

    A token is *valid* when ``mask`` is set and its anchor log-prob and advantage (and any
    ``extra_finite`` check) are finite. Invalid tokens are made *neutral*: log-ratio 0 (r = 1),
    mu = 1, A = 0, so every objective and gradient is exactly 0 there and no NaN can reach the
    backward pass. Masked-but-non-finite tokens are counted in ``num_dropped``.

    Everything here is a constant (no autograd graph); :meth:`finish` attaches the gradient.
    Attributes (all shaped like the inputs, dtype :func:`compute_dtype`):
      valid      bool;  valid_f its 0/1 float version
      adv        advantage (0 where invalid)
      log_ratio  clamp(log pi - log mu, +-LOG_RATIO_CLAMP) (0 where invalid)
      ratio      r = exp(log_ratio);  ratio_adv = r * A (lazy)
      mu         exp(log mu) (1 where invalid; lazy);  prob_diff = pi - mu = mu (r - 1) (lazy)
      anchor     log mu (0 where invalid; lazy);  logp = log pi (0 where invalid; lazy)

    Cost matters (the benchmark times 1M tokens): CPU-slow ops (``isfinite``, bool-valued
    comparisons, ``where``) are used only where NaN safety needs them.
    """

    def __init__(self, logp: torch.Tensor, rollout_logp: torch.Tensor,
                 advantages: torch.Tensor, mask: torch.Tensor,
                 extra_finite: torch.Tensor | None = None) -> None:
        shape = logp.shape
        for name, t in (("rollout_logp", rollout_logp), ("advantages", advantages),
                        ("mask", mask)):
            if t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has {tuple(shape)}; "
                                 "all per-token inputs must have the same shape ([T])")
        dt = compute_dtype(logp.dtype)
        self.logp_in = logp.to(dt)  # differentiable; its gradient is attached by finish()
        self._logp_raw = self.logp_in.detach()
        self._anchor_raw = rollout_logp.detach().to(dt)
        adv = advantages.detach().to(dt)
        m = _as_bool_mask(mask.detach())
        both = self._anchor_raw + adv
        finite = (both - both) == 0  # False iff either is NaN or +-inf (cheaper than isfinite)
        if extra_finite is not None:
            finite = finite & extra_finite
        self.valid = m & finite
        self.valid_f = self.valid.to(dt)
        self.num_tokens = self.valid_f.sum()
        self.num_dropped = torch.count_nonzero(m).to(dt) - self.num_tokens
        self._denom = self.num_tokens.clamp(min=1.0)
        self.adv = torch.where(self.valid, adv, 0.0)
        self._lr_raw = torch.where(self.valid, self._logp_raw - self._anchor_raw, 0.0)
        self.log_ratio = self._lr_raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        self.ratio = torch.exp(self.log_ratio)
        self._cache: dict[str, torch.Tensor] = {}

    def _lazy(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def anchor(self) -> torch.Tensor:
        return self._lazy("anchor", lambda: torch.where(self.valid, self._anchor_raw, 0.0))

    @property
    def logp(self) -> torch.Tensor:
        return self._lazy("logp", lambda: torch.where(self.valid, self._logp_raw, 0.0))

    @property
    def mu(self) -> torch.Tensor:
        return self._lazy("mu", lambda: torch.exp(self.anchor))

    @property
    def ratio_m1(self) -> torch.Tensor:
        """r - 1 (0 where invalid)."""
        return self._lazy("ratio_m1", lambda: self.ratio - 1.0)

    @property
    def prob_diff(self) -> torch.Tensor:
        return self._lazy("prob_diff", lambda: self.mu * self.ratio_m1)

    @property
    def ratio_adv(self) -> torch.Tensor:
        return self._lazy("ratio_adv", lambda: self.ratio * self.adv)

    def finish(self, objective: torch.Tensor, cfg, *, weight: torch.Tensor | None = None,
               grad_ratio: torch.Tensor | None = None, grad_coef: torch.Tensor | None = None,
               weight_stats: dict | None = None, weight_neutral: bool = True,
               weight_can_be_negative: bool = True, clipped: torch.Tensor | None = None,
               regularizer: torch.Tensor | None = None,
               regularizer_sum: torch.Tensor | None = None,
               extra_metrics: Mapping[str, torch.Tensor] | None = None):
        """Build (per_token_loss, metrics) from the objective J and the gradient weight w.

        per_token_loss has value -J and d loss_t / d logp_t = -A_t * r_t * w_t (``grad_ratio``
        replaces r, e.g. GSPO's sequence ratio), and 0 beyond the log-ratio clamp.
        ``objective`` must be exactly 0 on invalid tokens (true for any objective built from the
        neutral values). ``weight=None`` means w = 1. ``weight_neutral`` promises w = 1 on invalid
        tokens (cheaper min/max), ``weight_can_be_negative=False`` skips the (then zero)
        negative-fraction scan. ``clipped``: bool tensor of tokens the loss clips or masks;
        ``regularizer``: per-token penalty subtracted from the objective (0 on invalid tokens).
        Fast path (DRPO/SPO): ``grad_coef`` = A r w, ``weight_stats`` = the four loss/weight_*
        metrics and ``regularizer_sum`` given directly instead of ``weight``/``regularizer``.
        """
        with torch.no_grad():
            if grad_coef is not None:
                coef = grad_coef
            elif grad_ratio is None:
                coef = self.ratio_adv.clone() if weight is None else self.ratio_adv * weight
            else:
                coef = grad_ratio * self.adv
                if weight is not None:
                    coef.mul_(weight)
            coef.mul_(self.log_ratio == self._lr_raw).neg_()  # zero gradient beyond the clamp
            metrics = self._metrics(cfg, weight, weight_neutral, weight_can_be_negative, clipped,
                                    regularizer, weight_stats is not None)
            if weight_stats is not None:
                metrics.update(weight_stats)
            if regularizer_sum is not None:
                metrics["loss/regularizer"] = regularizer_sum / self._denom
            if extra_metrics:
                metrics.update(extra_metrics)
            metrics = {k: v.float() for k, v in metrics.items()}
        loss = _PolicySurrogate.apply(self.logp_in, -objective, coef)
        return loss, metrics

    # -- metrics ---------------------------------------------------------------------------
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over valid tokens of a finite tensor."""
        return torch.dot(x.reshape(-1), self.valid_f.reshape(-1)) / self._denom

    def frac(self, cond: torch.Tensor) -> torch.Tensor:
        """Fraction of valid tokens where the bool ``cond`` holds."""
        return torch.count_nonzero(cond & self.valid).to(self._denom.dtype) / self._denom

    def frac_gt(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """Fraction of valid tokens with x > threshold (x finite; float ops only)."""
        return self.mean(torch.sign(x - threshold).clamp_(min=0.0))

    def minmax(self, x: torch.Tensor, mean: torch.Tensor, neutral: float | None = None):
        """(min, max) over valid tokens; +inf/-inf when there are none.

        Invalid entries are replaced by ``mean`` (always inside [min, max] of the valid ones).
        With ``neutral`` (the known value of x on invalid tokens) that is one fused op.
        """
        if x.numel() == 0:
            return torch.tensor(_INF), torch.tensor(-_INF)
        if neutral is None:
            filled = torch.where(self.valid, x, mean)
        else:
            filled = torch.addcmul(x, self._lazy("inv_f", lambda: 1.0 - self.valid_f),
                                   mean - neutral)
        lo, hi = torch.aminmax(filled)
        empty = self.num_tokens == 0
        return torch.where(empty, _INF, lo), torch.where(empty, -_INF, hi)

    def stats(self, prefix: str, x: torch.Tensor, neutral: float | None = None) -> dict:
        """{prefix_mean, prefix_min, prefix_max} of a finite tensor over the valid tokens."""
        mean = self.mean(x)
        lo, hi = self.minmax(x, mean, neutral)
        return {prefix + "_mean": mean, prefix + "_min": lo, prefix + "_max": hi}

    def _metrics(self, cfg, weight, weight_neutral, weight_can_be_negative, clipped,
                 regularizer, weight_stats_given: bool = False) -> dict:
        out = {"loss/num_tokens": self.num_tokens, "loss/dropped_nonfinite": self.num_dropped}
        out.update(self.stats("loss/ratio", self.ratio, neutral=1.0))
        out["loss/prob_diff_gt_delta_frac"] = self.frac_gt(self.prob_diff.abs(),
                                                           cfg.monitor_delta)
        zero = torch.zeros((), dtype=self._denom.dtype, device=self._denom.device)
        if weight is None and weight_stats_given:
            pass
        elif weight is None:
            out.update({"loss/weight_mean": zero + 1, "loss/weight_min": zero + 1,
                        "loss/weight_max": zero + 1, "loss/weight_neg_frac": zero})
        else:
            out.update(self.stats("loss/weight", weight, neutral=1.0 if weight_neutral else None))
            out["loss/weight_neg_frac"] = (self.frac_gt(-weight, 0.0)
                                           if weight_can_be_negative else zero)
        if clipped is not None:
            out["loss/clipfrac_adv_pos"] = self.frac(clipped & (self.adv > 0))
            out["loss/clipfrac_adv_neg"] = self.frac(clipped & (self.adv < 0))
        if regularizer is not None:
            out["loss/regularizer"] = regularizer.sum() / self._denom
        return out


def _count_key(key: str) -> str:
    return "mismatch/is_num_tokens" if key.startswith("mismatch/is_") else "loss/num_tokens"


def reduce_metrics(metric_dicts: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Combine metric dicts of several calls (micro-batches, ranks) into python floats.

    Counts (``*num_tokens``, ``*dropped_nonfinite``) are summed, ``*_min`` / ``*_max`` reduced by
    min / max, every other key is averaged with the call's token count as weight.
    """
    dicts = [{k: float(v) for k, v in d.items()} for d in metric_dicts]
    keys: list[str] = []
    for d in dicts:
        keys.extend(k for k in d if k not in keys)
    out: dict[str, float] = {}
    for k in keys:
        vals = [(d[k], d.get(_count_key(k), 1.0)) for d in dicts if k in d]
        if k.endswith("num_tokens") or k.endswith("dropped_nonfinite"):
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_min"):
            out[k] = min(v for v, _ in vals)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        else:
            total = sum(n for _, n in vals)
            out[k] = sum(v * n for v, n in vals) / total if total > 0 else 0.0
    return out
