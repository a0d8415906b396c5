"""The sample: what the rollout side produces and the trainer consumes.

A neutral module (it imports nothing from the package): ``rollout/`` builds samples from SGLang's
outputs, ``training/`` packs them into micro-batches, ``mismatch/`` and the run files read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One generated response.  Token lists are python ints/floats (host memory)."""

    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]  # µ: [len(response_ids)], log-prob of each sampled token
    text: str
    finish_reason: str
    weight_version: str
    answer: str = ""
    reward: float = 0.0
    advantage: float = 0.0
    # False: the sample is excluded from the loss and its denominators (rollout.overlong: filter);
    # its reward still enters its group's advantage baseline.
    in_loss: bool = True
    # µ's top-K per response token (only when the loss needs them): [len(response_ids)][K]
    topk_ids: list[list[int]] | None = None
    topk_logp: list[list[float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)
