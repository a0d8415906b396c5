"""Group-relative advantage estimators (one scalar per sample, broadcast to its tokens later).

``rewards`` is [B] with B = num_groups * group_size; consecutive blocks of ``group_size`` samples
are the responses to one prompt. With r_i the rewards of a group of size G:

  grpo     (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (torch.std default,
           as in the GRPO reference implementations).
  dr_grpo  r_i - mean(r)  (Dr.GRPO: no std division; the DRPO paper's recipe, the default).
  rloo     r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))  (leave-one-out baseline).

A group whose rewards are all equal gets advantage 0 for every estimator.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

#: Group advantage estimators (:func:`compute_advantages`); the config field ``loss.advantage``.
AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]
ADVANTAGE_ESTIMATORS = get_args(AdvantageEstimator)


def compute_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "dr_grpo",
                       eps: float = 1e-6) -> torch.Tensor:
    """Return fp32 advantages [B] for fp rewards [B] grouped in consecutive blocks."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}. Fix: choose one of "
                         f"{list(ADVANTAGE_ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size = {group_size!r} is invalid: must be an integer >= 1")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}. "
                         "Fix: pass all samples of every prompt (B = prompts * group_size)")
    if estimator in ("grpo", "rloo") and group_size < 2:
        raise ValueError(f"estimator {estimator!r} needs group_size >= 2 (got {group_size}). "
                         "Fix: sample several responses per prompt or use dr_grpo")
    r = rewards.detach().float().view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if estimator == "dr_grpo":
        adv = centered
    elif estimator == "grpo":
        adv = centered / (r.std(dim=1, keepdim=True) + eps)
    else:
        adv = centered * (group_size / (group_size - 1))
    return adv.reshape(-1)
