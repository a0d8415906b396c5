"""Pack RL samples into padded Megatron micro-batches.

Layout (documented choice: right padding, one sequence per row, no packing):

- ``tokens``        [B, S] int64: prompt ids then response ids, right-padded with ``pad_id``.
- ``position_ids``  [B, S] int64: 0..S-1 (padding positions are never attended to by real tokens
  under the causal mask, so their positions do not matter).
- ``targets``       [B, S] int64: ``tokens`` shifted left by one (the token each position predicts).
- ``loss_mask``     [B, S] bool: True where the *target* is a response token; the logits at
  position j predict token j+1, so the response token k of a sample whose prompt has length P
  sits at ``loss_mask[b, P - 1 + k]``.
- ``rollout_logp``  [B, S] fp32: µ of the target token where ``loss_mask``; 0 elsewhere.
- ``advantages``    [B, S] fp32: the sample's advantage broadcast over its response tokens.
- ``seq_ids``       [B, S] int64: a step-global sequence index (for sequence-level losses and
  seq-mean aggregation); -1 on padding.
- ``train_mask``    [B, S] bool: ``loss_mask`` without the samples excluded from the loss
  (``Sample.in_loss`` False: ``rollout.overlong: filter``); the loss and its denominators use it,
  log-probs are still computed on all of ``loss_mask``.
- ``seq_in_loss``   [B] bool: the row's sample is in the loss (sequence denominators).
- ``topk_ids`` / ``topk_logp`` [B, S, K] int64 / fp32: µ's top-K ids and log-probs of each
  response token (DPPO top-K) where ``loss_mask``, 0 elsewhere; only with ``with_topk``.
- ``routes`` [B, S, L, K] int16: the engine's routed experts of each position (routing replay,
  ``Sample.routed_experts``: rows 0 .. P + R - 2), the filler ``0..K-1`` elsewhere (the last
  token, which the engine never ran, and padding); ``routes_valid`` [B, S] bool marks the rows
  that are the engine's.  Only with ``with_routes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from drpo_megatron.samples import Sample


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    seq_ids: torch.Tensor
    train_mask: torch.Tensor | None = None
    seq_in_loss: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logp: torch.Tensor | None = None
    routes: torch.Tensor | None = None
    routes_valid: torch.Tensor | None = None

    def __post_init__(self):
        if self.train_mask is None:
            self.train_mask = self.loss_mask
        if self.seq_in_loss is None:
            self.seq_in_loss = torch.ones(self.loss_mask.shape[0], dtype=torch.bool)

    @property
    def num_tokens(self) -> int:
        """Tokens in the loss (its token denominators)."""
        return int(self.train_mask.sum())

    @property
    def num_seqs(self) -> int:
        """Sequences in the loss (its sequence denominators)."""
        return int(((self.seq_ids.max(dim=1).values >= 0) & self.seq_in_loss).sum())


def pack_samples(samples: Sequence[Sample], *, pad_id: int, seq_len: int | None = None,
                 first_seq_id: int = 0, with_topk: bool = False,
                 with_routes: bool = False) -> MicroBatch:
    """Pack ``samples`` into one micro-batch of width ``seq_len`` (default: the longest sample).

    ``with_topk``: also pack µ's top-K ids / log-probs (every sample must carry them);
    ``with_routes``: the engine's routed experts (every sample must carry them)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = seq_len if seq_len is not None else max(lengths)
    if max(lengths) > width:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit seq_len={width}")
    b = len(samples)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, width), dtype=torch.bool)
    rollout_logp = torch.zeros((b, width), dtype=torch.float32)
    advantages = torch.zeros((b, width), dtype=torch.float32)
    seq_ids = torch.full((b, width), -1, dtype=torch.long)
    seq_in_loss = torch.tensor([bool(s.in_loss) for s in samples], dtype=torch.bool)
    topk_ids = topk_logp = None
    if with_topk:
        if any(s.topk_ids is None or s.topk_logp is None for s in samples):
            raise ValueError("pack_samples: the loss needs the rollout engine's top-K log-probs but "
                             "a sample carries none (they are requested when LOSS_EXTRAS of the "
                             "loss lists topk_logp: run.rollout_top_k)")
        k = len(next((row for s in samples for row in s.topk_ids), []))
        topk_ids = torch.zeros((b, width, k), dtype=torch.long)
        topk_logp = torch.zeros((b, width, k), dtype=torch.float32)
    routes = routes_valid = None
    if with_routes:
        routes, routes_valid = _pack_routes(samples, width)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
        sl = slice(p - 1, p - 1 + r)
        loss_mask[i, sl] = True
        rollout_logp[i, sl] = torch.tensor(s.rollout_logp, dtype=torch.float32)
        advantages[i, sl] = float(s.advantage)
        seq_ids[i, : len(seq)] = first_seq_id + i
        if topk_ids is not None and r:
            ids = torch.tensor(s.topk_ids, dtype=torch.long)
            lps = torch.tensor(s.topk_logp, dtype=torch.float32)
            if ids.shape != (r, topk_ids.shape[2]) or lps.shape != ids.shape:
                raise ValueError(f"pack_samples: sample {i} has top-K ids {tuple(ids.shape)} and "
                                 f"log-probs {tuple(lps.shape)}, expected ({r}, "
                                 f"{topk_ids.shape[2]}) (one row of K per response token)")
            topk_ids[i, sl] = ids
            topk_logp[i, sl] = lps
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    train_mask = loss_mask & seq_in_loss.unsqueeze(1)
    return MicroBatch(tokens, position_ids, targets, loss_mask, rollout_logp, advantages, seq_ids,
                      train_mask=train_mask, seq_in_loss=seq_in_loss, topk_ids=topk_ids,
                      topk_logp=topk_logp, routes=routes, routes_valid=routes_valid)


def _pack_routes(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, L, K] int16 routes (the filler 0..K-1 where the engine has none) and [B, S] bool."""
    if any(s.routed_experts is None for s in samples):
        raise ValueError("pack_samples: routing replay needs the engine's routed experts but a "
                         "sample carries none (rollout.routing_replay requests them)")
    shapes = {s.routed_experts.shape[1:] for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"pack_samples: samples carry routes of different [layers, top_k]: "
                         f"{sorted(shapes)}")
    (n_layers, k), = shapes
    routes = torch.arange(k, dtype=torch.int16).expand(len(samples), width, n_layers, k).clone()
    valid = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        t = len(s.prompt_ids) + len(s.response_ids) - 1
        if s.routed_experts.num_tokens != t:
            raise ValueError(f"pack_samples: sample {i} has routes of {s.routed_experts.num_tokens} "
                             f"tokens, expected prompt + response - 1 = {t}")
        routes[i, :t] = torch.from_numpy(s.routed_experts.array().astype(np.int16))
        valid[i, :t] = True
    return routes, valid
