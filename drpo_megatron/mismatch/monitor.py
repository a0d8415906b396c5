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

import numpy as np
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

    def measure(self, step: int, samples: Sequence[Sample], logp: Sequence[torch.Tensor],
                routes: Any = None) -> dict[str, float]:
        """``routes``: the trainer's routing of the same forward (routing replay record /
        replay: an object with ``layers`` [L] and ``per_sample[i]`` [len(response), L, K], e.g.
        ``actor.recorded_routes()``); with it and the engine's routes on the samples the
        ``mismatch/moe/*`` metrics compare them on every response token, per layer."""
        flat = torch.cat(list(logp))
        mu = torch.cat([torch.tensor(s.rollout_logp, dtype=torch.float32) for s in samples])
        seq = torch.cat([torch.full((len(s.rollout_logp),), i) for i, s in enumerate(samples)])
        adv = torch.cat([torch.full((len(s.rollout_logp),), s.advantage) for s in samples])
        mask = torch.ones_like(flat, dtype=torch.bool)
        moe = {}
        if routes is not None and samples and all(s.routed_experts is not None for s in samples):
            moe = dict(routed_experts_train=torch.from_numpy(np.concatenate(
                           [np.asarray(r, dtype=np.int64) for r in routes.per_sample])),
                       routed_experts_rollout=torch.from_numpy(np.concatenate(
                           [engine_response_routes(s, routes.layers) for s in samples])),
                       routed_layer_ids=routes.layers)
        metrics = compute_mismatch_metrics(flat, mu, mask, seq_ids=seq, advantages=adv,
                                           delta=self.delta, **moe)
        if self.writers is not None:
            self.writers.log_histograms(step, mismatch_histogram_tensors(
                flat, mu, mask, advantages=adv, delta=self.delta))
        return metrics


def engine_response_routes(sample: Sample, layers: Sequence[int]) -> np.ndarray:
    """The engine's experts of ``sample``'s response tokens at ``layers``: int64 [R, len(layers),
    K]; row k is the position ``len(prompt) - 1 + k`` whose forward gives π of response token k
    (``Sample.routed_experts``)."""
    p, r = len(sample.prompt_ids), len(sample.response_ids)
    arr = sample.routed_experts.array()
    return arr[p - 1: p - 1 + r][:, list(layers)].astype(np.int64)
