"""Reduce a per-token loss to the scalar that is back-propagated, with global denominators.

One optimizer step usually spans several micro-batches (gradient accumulation) and data-parallel
ranks. To make the step's gradient independent of how tokens are split, every micro-batch divides
by the *global* count of the step (all micro-batches, all DP ranks), which the caller computes
once (e.g. an all-reduce of the mask sums) and passes in. The per-micro-batch results then simply
add up (and DP gradient averaging must then be a sum, or the caller multiplies by the DP size).
When a count is None the local count of this call is used (single micro-batch, single rank).

Modes (L_t = per-token loss, m_t = mask, i = sequence, |i| = its valid tokens):
  token-mean               sum_t m_t L_t / N_tokens
  seq-mean-token-mean      sum_i (sum_{t in i} m_t L_t / |i|) / N_seqs
  seq-mean-token-sum       sum_t m_t L_t / N_seqs
  seq-mean-token-sum-norm  sum_t m_t L_t / (N_seqs * horizon)  (Dr.GRPO / the DRPO paper's
                           setting, horizon = max response length, e.g. 8192: a constant, so the
                           result does not depend on padding width or response lengths)
N_seqs counts sequences with at least one valid token. For seq-mean-token-mean every sequence
must lie entirely in one call (its |i| is computed locally).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ._common import dense_seq_index

#: Loss aggregation modes (see :func:`aggregate_loss`); the config field ``loss.aggregation``.
AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                          "seq-mean-token-sum-norm"]
AGGREGATION_MODES = get_args(AggregationMode)


def _denominator(value, local: torch.Tensor) -> torch.Tensor:
    if value is None:
        value = local
    if not torch.is_tensor(value):
        value = torch.tensor(float(value), device=local.device)
    return value.to(device=local.device, dtype=torch.float32).clamp(min=1.0)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, *,
                   seq_ids: torch.Tensor | None = None, global_num_tokens=None,
                   global_num_seqs=None, horizon: int | float | None = None) -> torch.Tensor:
    """Reduce ``per_token_loss`` to a 0-dim fp32 tensor (see the module docstring for the modes).

    Args:
      per_token_loss: [T] (or [B, L]) loss of each token, any float dtype; computed in fp32.
      mask: same shape, bool or 0/1; masked tokens contribute exactly 0 (even if NaN).
      mode: one of :data:`AGGREGATION_MODES`.
      seq_ids: same shape, integer sequence index of each token; needed by the seq-* modes. For a
        2-D [B, L] input it defaults to the row index.
      global_num_tokens: valid tokens in the whole step (token-mean); None = local count.
      global_num_seqs: sequences in the whole step (seq-* modes); None = local count.
      horizon: constant token horizon H > 0, required by seq-mean-token-sum-norm.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}. Fix: choose one of "
                         f"{list(AGGREGATION_MODES)}")
    if mask.shape != per_token_loss.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != loss shape "
                         f"{tuple(per_token_loss.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    loss = torch.where(m, per_token_loss.float(), 0.0)
    total = loss.sum()
    if mode == "token-mean":
        return total / _denominator(global_num_tokens, m.sum())

    if seq_ids is None:
        if per_token_loss.dim() != 2:
            raise ValueError(f"aggregation {mode!r} needs seq_ids for a {per_token_loss.dim()}-D "
                             "loss. Fix: pass seq_ids (sequence index of every token)")
        seq_ids = torch.arange(per_token_loss.shape[0], device=loss.device).unsqueeze(1)
        seq_ids = seq_ids.expand_as(per_token_loss)
    if seq_ids.shape != per_token_loss.shape:
        raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} != loss shape "
                         f"{tuple(per_token_loss.shape)}")
    inv, n = dense_seq_index(seq_ids)
    counts = torch.zeros(n, device=loss.device).index_add_(0, inv, m.reshape(-1).float())
    local_seqs = (counts > 0).sum()
    num_seqs = _denominator(global_num_seqs, local_seqs)

    if mode == "seq-mean-token-mean":
        sums = torch.zeros(n, device=loss.device).index_add(0, inv, loss.reshape(-1))
        return (sums / counts.clamp(min=1.0)).sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return total / num_seqs
    if horizon is None or not horizon > 0:
        raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs a constant horizon > 0, "
                         f"got {horizon!r}. Fix: pass horizon=<max response length, e.g. 8192>")
    return total / (num_seqs * float(horizon))


def count_sequences(mask: torch.Tensor, seq_ids: torch.Tensor) -> int:
    """Number of sequences with at least one valid token (sum this over micro-batches/ranks to
    get ``global_num_seqs``)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return int(torch.unique(seq_ids[m]).numel()) if bool(m.any()) else 0
