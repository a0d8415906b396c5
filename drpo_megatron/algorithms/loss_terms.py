"""The loop's terms around a policy loss: off-policy correction and reference-model KL.

``add_loss_terms`` takes the per-token policy loss of any loss in ``POLICY_LOSSES`` and returns

    L_t = c_t * policy_loss_t  +  beta * KL_t(pi || ref)

on the tokens of ``mask`` (exactly 0 elsewhere), to be aggregated like the policy loss:

* ``c_t`` (``loss.correction``, :func:`~.corrections.compute_correction_weights`): a constant
  weight from rho = pi_old / mu (the training engine's log-probs recomputed before the step's
  first update over the rollout engine's); 1 when the correction is none.  It scales the policy
  gradient token by token, whatever the loss.  The KL term is not corrected.
* ``KL_t`` (``loss.kl`` with ``in_reward: false``): :func:`~.kl.kl_estimate` of the current
  policy's log-probs against the frozen reference's, differentiable in ``logp`` (the reference
  is a constant).  Tokens with a non-finite reference log-prob get no KL term.

Metrics: ``loss/kl_ref`` (mean KL_t over the masked tokens), and the correction's
``loss/correction/{num_tokens, dropped_nonfinite, ratio_*, weight_*, truncated_frac (tis kinds),
rejected_frac (mis kinds)}`` (reduced by ``reduce_metrics`` like the loss metrics).
"""

from __future__ import annotations

import torch

from .config import KLConfig
from .corrections import CorrectionConfig, apply_off_policy_correction
from .kl import kl_estimate

CORRECTION_PREFIX = "loss/correction/"


def correction_metric_name(key: str) -> str:
    """``mismatch/is_<x>`` of the correction library -> ``loss/correction/<x>``."""
    return CORRECTION_PREFIX + key.removeprefix("mismatch/is_")


def add_loss_terms(per_token_loss: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, *,
                   anchor: str, kl: KLConfig | None = None,
                   correction: CorrectionConfig | None = None,
                   ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None,
                   rollout_logp: torch.Tensor | None = None,
                   seq_ids: torch.Tensor | None = None):
    """Return ``(L, metrics)`` (module docstring).  All tensors share ``logp``'s shape [T].

    ``anchor``: the loss's anchor ("rollout" | "old_policy"); a reweighting correction with the
    rollout anchor raises (counted twice).  ``old_logp`` (pi_old) and ``rollout_logp`` (mu) are
    needed with a correction, ``ref_logp`` with ``kl.in_loss``; ``seq_ids`` by the sequence-level
    corrections."""
    metrics: dict[str, torch.Tensor] = {}
    out = per_token_loss
    m = mask if mask.dtype == torch.bool else mask != 0
    if correction is not None and correction.kind != "none":
        if old_logp is None or rollout_logp is None:
            raise ValueError(f"loss.correction.kind={correction.kind!r} needs old_logp (pi_old) "
                             "and rollout_logp (mu)")
        out, cm = apply_off_policy_correction(out, old_logp, rollout_logp, m, correction,
                                              anchor=anchor, seq_ids=seq_ids)
        metrics.update({correction_metric_name(k): v for k, v in cm.items()})
    if kl is not None and kl.in_loss:
        if ref_logp is None:
            raise ValueError("loss.kl.coef > 0 (in the loss) needs the reference log-probs")
        valid = m & torch.isfinite(ref_logp)
        # a masked / non-finite reference token must not send NaN through the backward either
        ref = torch.where(valid, ref_logp, logp.detach())
        k = torch.where(valid, kl_estimate(logp, ref, kl.estimator), 0.0)
        out = out + kl.coef * k
        metrics["loss/kl_ref"] = k.detach().sum() / valid.sum().clamp(min=1)
    return out, metrics


@torch.no_grad()
def kl_reward_penalty(rollout_logp: torch.Tensor, ref_logp: torch.Tensor, kl: KLConfig):
    """``loss.kl.in_reward``: per-token ``beta * KL_t(mu || ref)`` ([T]) of one response, from
    the rollout log-probs mu (the policy that sampled the tokens) and the reference's; the
    sample's reward loses its sum.  Non-finite tokens contribute 0."""
    valid = torch.isfinite(rollout_logp) & torch.isfinite(ref_logp)
    mu = torch.where(valid, rollout_logp, 0.0)
    ref = torch.where(valid, ref_logp, 0.0)
    return torch.where(valid, kl.coef * kl_estimate(mu, ref, kl.estimator), 0.0)
