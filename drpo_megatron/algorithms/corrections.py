"""Off-policy (training/inference mismatch) corrections that compose with any policy loss.

A correction turns rho_t = pi_train(y_t) / mu(y_t) into a *constant* per-token weight c_t >= 0 and
the corrected loss is c_t * per_token_loss_t. Because c_t is a constant, the gradient of every
loss is simply rescaled (or zeroed) token by token, whatever the loss is. Rejected tokens get
c_t = 0 but keep their place in the aggregation denominators (as in IcePop), so rejecting tokens
never inflates the weight of the others.

Kinds (:class:`CorrectionConfig`; rho_seq = prod_t rho_t, rho_geo = exp(mean_t log rho_t) over the
valid tokens of a sequence; log-space clamp +-20):
  none     c = 1
  tis      c = min(rho_t, high)                                   token truncated IS
  mis      c = rho_t * 1[low <= rho_t <= high]                     token masked IS
  icepop   = mis with IcePop's band [0.5, 5] (Ring-1T: the token's ratio outside the band
           masks its gradient, inside it reweights)
  seq_tis  c = min(rho_seq, high) for every token of the sequence
  seq_mis  c = rho_seq * 1[low <= rho_seq <= high]
  geo_mis  c = 1[low <= rho_geo <= high]                           sequence rejection by the
                                                                   geometric-mean ratio
``reject_only=True`` makes mis / icepop / seq_mis use 1 instead of rho inside the band (pure
rejection).

Which log-probs: ``train_logp`` is the training engine's log-prob of the sampled tokens (detached),
``rollout_logp`` the rollout engine's mu.  The loop (``loss.correction``, training/actor.py) always
passes pi_old, the training engine's log-probs recomputed before the step's first update, so rho
measures the training/inference mismatch of the policy that sampled: with the "old_policy" anchor
this is the decoupled objective rho * (pi / pi_old) * A.
With the rollout anchor the loss ratio pi / mu already *is* the importance weight, so a
reweighting correction (tis, seq_tis, mis/seq_mis without reject_only) would count rho twice:
:func:`apply_off_policy_correction` refuses that combination instead of silently changing the
loss; only the rejection forms (geo_mis, mis/seq_mis with reject_only) compose with it.

Metrics (under ``mismatch/is_``; counts summed, ``_min``/``_max`` by min/max, the rest are means
over valid tokens weighted by ``mismatch/is_num_tokens``): ``num_tokens``, ``dropped_nonfinite``
(masked tokens with a non-finite train or rollout log-prob: c = 0), ``ratio_mean/min/max`` (the
rho the kind uses), ``weight_mean/min/max``, ``truncated_frac`` (tis kinds) or ``rejected_frac``
(mis kinds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from typing import Literal, get_args

import torch

from ._common import LOG_RATIO_CLAMP, dense_seq_index

#: loss.correction.kind
CorrectionKind = Literal["none", "tis", "mis", "icepop", "seq_tis", "seq_mis", "geo_mis"]
CORRECTION_KINDS = get_args(CorrectionKind)
_TRUNCATING = ("tis", "seq_tis")
_BANDED = ("mis", "icepop", "seq_mis", "geo_mis")
_MASKED_IS = ("mis", "icepop", "seq_mis")  # rho inside the band (or 1 with reject_only), 0 outside

# Default bounds per kind. Token and sequence ratios: truncate at 2 (the TIS setting) and reject
# outside [0.5, 2] (symmetric in log space). The geometric mean is a per-token average whose
# spread is ~|log rho| per token (~1e-2 in BF16), hence a band of about +-1%.
DEFAULT_BOUNDS = {
    "tis": (None, 2.0),
    "seq_tis": (None, 2.0),
    "mis": (0.5, 2.0),
    "icepop": (0.5, 5.0),  # IcePop's alpha, beta (Ring-1T)
    "seq_mis": (0.5, 2.0),
    "geo_mis": (0.99, 1.01),
}


def _bad(name, value, why, fix):
    raise ValueError(f"CorrectionConfig.{name} = {value!r} is invalid: {why}. Fix: {fix}")


@dataclass
class CorrectionConfig:
    """Off-policy correction. ``low``/``high`` None take :data:`DEFAULT_BOUNDS` of the kind."""

    kind: str = "none"
    low: float | None = None
    high: float | None = None
    reject_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CORRECTION_KINDS:
            _bad("kind", self.kind, f"must be one of {list(CORRECTION_KINDS)}",
                 "choose one of those (default 'none')")
        if not isinstance(self.reject_only, bool):
            _bad("reject_only", self.reject_only, "must be true or false", "set true or false")
        for name in ("low", "high"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    _bad(name, v, "must be a number", f"set {name} to a positive number")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or v == float("inf"):
                _bad(name, v, "must be a finite number > 0", f"set {name} to a positive number")
            setattr(self, name, float(v))
        if self.kind == "none":
            return
        d_low, d_high = DEFAULT_BOUNDS[self.kind]
        if self.kind in _TRUNCATING and self.low is not None:
            _bad("low", self.low, f"kind {self.kind!r} only truncates from above",
                 "remove low, or use kind mis/seq_mis for a band")
        if self.reject_only and self.kind not in _MASKED_IS:
            _bad("reject_only", True, f"only applies to {list(_MASKED_IS)}, not {self.kind!r}",
                 "remove reject_only (geo_mis always rejects only)")
        self.low = d_low if (self.low is None and self.kind in _BANDED) else self.low
        self.high = d_high if self.high is None else self.high
        if self.low is not None and not self.low < self.high:
            _bad("low", self.low, f"must be < high = {self.high}", "set low < high")

    @property
    def reweights(self) -> bool:
        """True if the weight carries rho (not only a 0/1 rejection)."""
        return self.kind in _TRUNCATING or (self.kind in _MASKED_IS and not self.reject_only)


def make_correction_config(params: dict | None = None) -> CorrectionConfig:
    """Build a :class:`CorrectionConfig` from a (YAML) mapping; ValueError for unknown keys."""
    params = dict(params or {})
    known = [f.name for f in dataclasses.fields(CorrectionConfig)]
    for k, v in params.items():
        if k not in known:
            raise ValueError(f"CorrectionConfig: unknown key {k!r} (value {v!r}). Fix: use only "
                             f"{known}")
    return CorrectionConfig(**params)


def _seq_reduce(x: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor, mean: bool):
    inv, n = dense_seq_index(seq_ids)
    xs = torch.zeros(n, device=x.device).index_add_(0, inv, x.reshape(-1))
    if mean:
        cnt = torch.zeros(n, device=x.device).index_add_(0, inv, valid.reshape(-1).float())
        xs = xs / cnt.clamp(min=1.0)
    return xs[inv].reshape(x.shape)


@torch.no_grad()
def compute_correction_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor,
                               mask: torch.Tensor, cfg: CorrectionConfig, *,
                               seq_ids: torch.Tensor | None = None):
    """Return (weights, metrics): fp32 constant c_t (0 on invalid tokens) shaped like the inputs.

    ``seq_ids`` (integer, same shape) is required by seq_tis, seq_mis and geo_mis.
    """
    if train_logp.shape != rollout_logp.shape or mask.shape != train_logp.shape:
        raise ValueError("train_logp, rollout_logp and mask must have the same shape")
    m = mask if mask.dtype == torch.bool else mask != 0
    lt, lr_ = train_logp.detach().float(), rollout_logp.detach().float()
    finite = torch.isfinite(lt) & torch.isfinite(lr_)
    valid = m & finite
    n_valid = valid.sum()
    denom = n_valid.clamp(min=1)
    metrics = {"mismatch/is_num_tokens": n_valid.float(),
               "mismatch/is_dropped_nonfinite": (m & ~finite).sum().float()}
    if cfg.kind == "none":
        return valid.float(), metrics
    log_rho = torch.where(valid, lt - lr_, 0.0)
    if cfg.kind in ("tis", "mis", "icepop"):
        log_rho_used = log_rho
    else:
        if seq_ids is None or seq_ids.shape != log_rho.shape:
            raise ValueError(f"correction {cfg.kind!r} needs seq_ids (integer tensor shaped like "
                             "the log-probs). Fix: pass seq_ids=...")
        log_rho_used = _seq_reduce(log_rho, valid, seq_ids, mean=cfg.kind == "geo_mis")
    rho = torch.exp(log_rho_used.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    if cfg.kind in _TRUNCATING:
        weight = rho.clamp(max=cfg.high)
        metrics["mismatch/is_truncated_frac"] = ((rho > cfg.high) & valid).sum() / denom
    else:
        inside = (rho >= cfg.low) & (rho <= cfg.high)
        if cfg.kind == "geo_mis" or cfg.reject_only:
            weight = inside.float()
        else:
            weight = torch.where(inside, rho, 0.0)
        metrics["mismatch/is_rejected_frac"] = (~inside & valid).sum() / denom
    weight = torch.where(valid, weight, 0.0)

    inf = float("inf")
    metrics.update({
        "mismatch/is_ratio_mean": torch.where(valid, rho, 0.0).sum() / denom,
        "mismatch/is_ratio_min": torch.where(valid, rho, inf).amin() if rho.numel()
        else torch.tensor(inf),
        "mismatch/is_ratio_max": torch.where(valid, rho, -inf).amax() if rho.numel()
        else torch.tensor(-inf),
        "mismatch/is_weight_mean": weight.sum() / denom,
        "mismatch/is_weight_min": torch.where(valid, weight, inf).amin() if rho.numel()
        else torch.tensor(inf),
        "mismatch/is_weight_max": torch.where(valid, weight, -inf).amax() if rho.numel()
        else torch.tensor(-inf),
    })
    return weight, metrics


def apply_off_policy_correction(per_token_loss: torch.Tensor, train_logp: torch.Tensor,
                                rollout_logp: torch.Tensor, mask: torch.Tensor,
                                cfg: CorrectionConfig, *, anchor: str,
                                seq_ids: torch.Tensor | None = None):
    """Return (c * per_token_loss, metrics) for any loss's per-token output.

    ``anchor`` is the loss config's anchor ("rollout" | "old_policy"); a reweighting correction
    with the rollout anchor raises ValueError (see the module docstring). Tokens with c = 0 give
    an exact 0 (no NaN propagation from the loss either).
    """
    if anchor not in ("rollout", "old_policy"):
        raise ValueError(f"anchor = {anchor!r} is invalid. Fix: pass the loss config's anchor, "
                         "'rollout' or 'old_policy'")
    if anchor == "rollout" and cfg.reweights:
        raise ValueError(
            f"off-policy correction {cfg.kind!r} reweights by pi_train/mu, but the loss is "
            "anchored on the rollout log-probs, whose ratio pi/mu already is that importance "
            "weight: the correction would count it twice. Fix: set the loss's anchor: old_policy "
            "(recomputed pi_old), or use a rejection-only correction (geo_mis, or mis/seq_mis "
            "with reject_only: true)")
    weight, metrics = compute_correction_weights(train_logp, rollout_logp, mask, cfg,
                                                 seq_ids=seq_ids)
    out = torch.where(weight > 0, per_token_loss.float() * weight, 0.0)
    return out, metrics
