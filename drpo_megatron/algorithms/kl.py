"""Per-token KL-to-reference estimators (Schulman's k1, k2, k3) for an optional KL term.

Tokens are sampled from the current policy pi (approximately: from the rollout policy), and with
log rho = log pi_ref - log pi (clamped to +-20):

  k1 = -log rho = log pi - log pi_ref        unbiased for KL(pi || ref), high variance, can be < 0
  k2 = (log rho)^2 / 2                       biased, >= 0; as a loss its gradient
                                             (log pi - log pi_ref) grad log pi is the exact
                                             score-function gradient of KL(pi || ref)
  k3 = rho - 1 - log rho                     unbiased for KL(pi || ref), >= 0, low variance
  low_var_kl = min(k3, 10)                   k3 with its value capped (verl's "low_var_kl"): a
                                             token with a huge ratio contributes at most 10 and
                                             no gradient

``kl_estimate`` returns the per-token value [T] (differentiable w.r.t. ``logp``; ``ref_logp`` is
constant); reduce it with the same mask and aggregation as the policy loss and add beta times it.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ._common import LOG_RATIO_CLAMP, compute_dtype

#: loss.kl.estimator: the per-token KL estimators of :func:`kl_estimate`
KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
KL_ESTIMATORS = get_args(KLEstimator)
# low_var_kl's cap on the per-token value (verl's clamp of k3 to [-10, 10]; k3 >= 0)
LOW_VAR_KL_MAX = 10.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate of kind k1 | k2 | k3 | low_var_kl, fp32 (fp64 for fp64
    ``logp``), same shape as ``logp``."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}. Fix: choose one of {list(KL_ESTIMATORS)}")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape "
                         f"{tuple(logp.shape)}")
    dt = compute_dtype(logp.dtype)
    log_rho = (ref_logp.detach().to(dt) - logp.to(dt)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return -log_rho
    if kind == "k2":
        return 0.5 * log_rho * log_rho
    k3 = torch.exp(log_rho) - 1.0 - log_rho
    return k3.clamp(max=LOW_VAR_KL_MAX) if kind == "low_var_kl" else k3
