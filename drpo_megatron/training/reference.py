"""The frozen reference policy of ``loss.kl`` and the KL-in-reward step.

:class:`ReferencePolicy` is the initial policy (or ``loss.kl.ref_path``) built like the actor:
the same Megatron layout (TP / PP / EP), dtype, FP8 setting and log-prob path, without DDP, gradient
buffers or optimizer state (memory: one extra set of weights in the model dtype; ``drpo plan``
counts it).  Its :meth:`compute_logprobs` is the actor's (one forward, no grad): per-sample
log-probs of the response tokens at the rollout temperature, on every rank.

:func:`apply_kl_reward` is ``loss.kl.in_reward``: every sample's reward loses
``coef * sum_t KL_t(mu || ref)`` and the group advantages are computed again.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

from drpo_megatron.algorithms import kl_reward_penalty
from drpo_megatron.models import megatron_model as mm
from drpo_megatron.training.actor import ActorConfig, MegatronActor, _precision

log = logging.getLogger(__name__)


class ReferencePolicy(MegatronActor):
    """Forward-only copy of a policy checkpoint in the actor's layout (see the module doc).

    Shares :class:`MegatronActor`'s forward machinery (``compute_logprobs``); it has no
    optimizer and is never updated or exported."""

    def __init__(self, cfg: ActorConfig, path: str, pad_id: int = 0):
        self.cfg = cfg.model_copy(update={"hf_path": str(path)})
        self.pad_id = pad_id
        self.loss_cfg = cfg.loss.policy
        par = cfg.parallel
        t0 = time.time()
        overrides = ({} if cfg.model.moe_aux_loss_coeff is None else
                     {"moe_aux_loss_coeff": cfg.model.moe_aux_loss_coeff})
        self.bridge, self.provider, self.model = mm.load_policy_from_hf(
            str(path), dtype=cfg.model.dtype, tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp,
            seq_parallel=par.sequence_parallel, wrap_ddp=False, seed=cfg.seed,
            overrides=overrides or None, fp8=_precision(cfg), recompute=par.recompute)
        for m in self.model:
            m.eval()
            m.requires_grad_(False)
        self.optimizer = None
        self.routing = None  # the reference routes natively (no routing replay)
        self._entropy: dict[int, torch.Tensor] = {}
        self._needs_topk = False
        self._topk: dict[int, torch.Tensor] = {}
        log.info("reference policy ready: %s, %.2fM params, %.1fs", path,
                 sum(p.numel() for m in self.model for p in m.parameters()) / 1e6, time.time() - t0)

    def train_step(self, *args, **kwargs):
        raise TypeError("the reference policy is frozen: it has no train_step")


def apply_kl_reward(samples: Sequence, ref_logp: Sequence[torch.Tensor], kl,
                    assign_advantages: Callable[[Sequence], None]) -> dict[str, float]:
    """``loss.kl.in_reward``: ``reward -= coef * sum_t KL_t(mu || ref)`` for every sample (mu =
    its rollout log-probs), then ``assign_advantages(samples)`` again.  The task reward and the
    penalty stay on the sample (``meta["task_reward"]``, ``meta["kl_penalty"]``).  Returns
    ``rollout/kl_penalty_mean``, ``rollout/reward_with_kl_mean`` and ``loss/kl_ref`` (the mean
    per-token KL estimate)."""
    total_kl = tokens = 0.0
    for s, ref in zip(samples, ref_logp):
        mu = torch.tensor(s.rollout_logp, dtype=torch.float32)
        per_token = kl_reward_penalty(mu, ref.float(), kl)  # coef * KL_t
        penalty = float(per_token.sum())
        s.meta["task_reward"] = s.reward
        s.meta["kl_penalty"] = penalty
        s.reward = s.reward - penalty
        total_kl += penalty / kl.coef
        tokens += int(torch.isfinite(mu).sum())
    assign_advantages(samples)
    n = max(len(samples), 1)
    return {"rollout/kl_penalty_mean": sum(s.meta["kl_penalty"] for s in samples) / n,
            "rollout/reward_with_kl_mean": sum(s.reward for s in samples) / n,
            "loss/kl_ref": total_kl / max(tokens, 1.0)}
