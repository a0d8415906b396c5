"""Config sections of the trainer: the optimizer (``optim:``) and the actor, which is derived from
the run config's sections (``model``, ``parallel``, ``optim``, ``loss``), not re-declared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drpo_megatron.algorithms.config import LossSection
from drpo_megatron.models.config import ModelConfig, ParallelConfig
from drpo_megatron.schema import Section
from drpo_megatron.training.routing_replay import RoutingReplayMode

#: How the actor computes log-probs: "chunked" (final hidden states -> chunked vocab-parallel
#: log-probs, training/logprobs.py; never materialises [tokens, vocab]) or "logits" (the model's
#: full logits; a reference path for tests).
LogprobImpl = Literal["chunked", "logits"]


class OptimConfig(Section):
    """The Megatron optimizer (AdamW) and how a rollout step is split into updates."""

    lr: float = Field(default=1e-4, gt=0)
    """Learning rate (constant: the paper's recipe)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """AdamW beta2."""
    updates_per_rollout: int = Field(default=2, ge=1)
    """Optimizer steps per rollout step: the rollout batch is split into this many mini-batches
    of whole prompt groups (it must divide rollout.prompts_per_step)."""
    lr_schedule: Literal["constant"] = "constant"
    """Learning-rate schedule; only the paper's constant schedule is implemented."""


class ActorConfig(Section):
    """What the Megatron actor is built from: the run config's ``model``, ``parallel``,
    ``optim`` and ``loss`` sections as they are, the policy checkpoint resolved by the run, the
    rollout temperature (π is computed from logits / T, as SGLang computes µ) and the seed."""

    hf_path: str
    """HF checkpoint directory of the initial policy (resolved: the tiny one is built first)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The run config's model section."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """The run config's parallel section."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """The run config's optim section."""
    loss: LossSection = Field(default_factory=LossSection)
    """The run config's loss section (its typed policy config is ``loss.policy``)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the rollouts: log-probs are computed from logits / temperature."""
    seed: int = 1234
    """Megatron's model-parallel RNG seed."""
    logprob_chunk_size: int = Field(default=1024, ge=1)
    """Tokens per chunk of the vocab-parallel log-prob pass."""
    logprob_impl: LogprobImpl = "chunked"
    """"chunked" (the production path) or "logits" (full logits, a reference for tests)."""
    routing_replay: RoutingReplayMode = "off"
    """The run config's rollout.routing_replay: off | record (capture the trainer's routing in
    the mismatch forward) | replay (force the engine's experts; training/routing_replay.py)."""
