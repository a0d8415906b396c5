"""The mismatch monitor of the loop: the trainer's log-probs π of the rollout's samples (before
this step's updates) against the engine's µ, as ``mismatch/`` scalars (returned) and per-token
histograms (written to the run's writers).

Built from the typed loss config: the probability-space boundary δ of the DPPO-TV region and
of DRPO's weight statistics is the loss's own (``prob_space_delta``: DRPO, mask-DRPO, DPPO-TV and
its top-K variant); for a loss whose δ means something else (DPPO-KL's KL threshold, a penalty's
ratio-space scale) the monitor reports against DRPO's default δ instead of misreading it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from drpo_megatron.mismatch.metrics import (DRPO_DELTA_DEFAULT, compute_mismatch_metrics,
                                            mismatch_histogram_tensors)
from drpo_megatron.samples import Sample


class MismatchMonitor:
    """``measure(step, samples, logp)``: ``logp[i]`` is π of ``samples[i]``'s response tokens
    ([len(response_ids)] fp32, e.g. ``actor.compute_logprobs``); all response tokens count
    (mask all ones), sequences and advantages from the samples."""

    def __init__(self, loss_cfg: Any, writers: Any = None):
        delta = getattr(loss_cfg, "prob_space_delta", None)
        self.delta = float(delta) if delta is not None else DRPO_DELTA_DEFAULT
        self.writers = writers

    def measure(self, step: int, samples: Sequence[Sample],
                logp: Sequence[torch.Tensor]) -> dict[str, float]:
        flat = torch.cat(list(logp))
        mu = torch.cat([torch.tensor(s.rollout_logp, dtype=torch.float32) for s in samples])
        seq = torch.cat([torch.full((len(s.rollout_logp),), i) for i, s in enumerate(samples)])
        adv = torch.cat([torch.full((len(s.rollout_logp),), s.advantage) for s in samples])
        mask = torch.ones_like(flat, dtype=torch.bool)
        metrics = compute_mismatch_metrics(flat, mu, mask, seq_ids=seq, advantages=adv,
                                           delta=self.delta)
        if self.writers is not None:
            self.writers.log_histograms(step, mismatch_histogram_tensors(
                flat, mu, mask, advantages=adv, delta=self.delta))
        return metrics
