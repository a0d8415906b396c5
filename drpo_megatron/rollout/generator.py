"""The rollout side of the loop on the driver rank: generate, reward, advantages, evaluate.

:class:`RolloutGenerator` is built from the ``rollout`` section and talks to the *front* (one
SGLang server, a client-side :class:`~drpo_megatron.rollout.fleet.Fleet` or a
:class:`~drpo_megatron.rollout.router.RouterFleet`: the same ``generate`` signature).  It owns no
data cursor (the prompt stream, ``data/prompts.py``, does) and no weights (``weights/``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

from drpo_megatron.algorithms import compute_advantages
from drpo_megatron.data.math import encode_prompt
from drpo_megatron.rollout.engine import generate_groups, seeded_generate_groups
from drpo_megatron.rollout.routes import RouteSpec
from drpo_megatron.rollout.sampling import generate_scored_groups
from drpo_megatron.rewards.scorer import RewardScorer, attach_task
from drpo_megatron.samples import Sample

log = logging.getLogger(__name__)

#: k -> (prompt token ids [k], problems [k]); the prompt stream's ``next``
NextPrompts = Callable[[int], tuple[list[list[int]], list[Any]]]


def assign_advantages(samples: Sequence[Sample], group_size: int, estimator: str) -> None:
    """Group advantages (``loss.advantage``) of group-major ``samples`` from their rewards."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    adv = compute_advantages(rewards, group_size, estimator=estimator)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a


class RolloutGenerator:
    """Samples with rewards and advantages for one step, and held-out evaluation.

    ``cfg``: the ``rollout`` section; ``front``: what generates; ``reward``: the scorer of the
    ``reward`` section (``reward(samples)`` sets every reward; ``pop_metrics``, ``close``:
    rewards/scorer.py); ``advantage``: the estimator name (``loss.advantage``); ``seed`` / ``seeded``:
    ``train.seed`` / ``train.seeded_rollouts``; ``top_k``: µ's top-K log-probs to request (0 =
    none; DPPO top-K losses need them); ``eval_problems`` / ``eval_k``: the held-out set and k of
    avg@k; ``tokenizer``: encodes the eval prompts; ``routes``: the policy's route shape when
    the training samples must carry the engine's routed experts (``rollout.routing_replay``
    record / replay; evaluation never asks for them)."""

    def __init__(self, cfg: Any, front: Any, reward: RewardScorer, *, advantage: str, seed: int,
                 seeded: bool, top_k: int, eval_problems: Sequence[Any], eval_k: int, tokenizer,
                 routes: RouteSpec | None = None):
        self.cfg = cfg
        self.front = front
        self.reward = reward
        self.advantage = advantage
        self.seed = seed
        self.seeded = seeded
        self.top_k = top_k
        self.routes = routes
        self.eval_problems = list(eval_problems)
        self.eval_k = eval_k
        self._eval_prompts = [encode_prompt(tokenizer, p.prompt_text) for p in self.eval_problems]

    # ---------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[list[int]], problems: Sequence[Any], *,
                 step: int | None = None, first_group: int = 0) -> list[Sample]:
        """``samples_per_prompt`` samples of each prompt, group-major, group ids from
        ``first_group`` (the step-local index of ``prompts[0]``: seeds stay distinct across
        dynamic-sampling rounds).  With ``step`` and ``seeded``: one request per sample with its
        own ``sampling_seed`` (rollout/engine.py); with µ's top-K log-probs when ``top_k``.
        Each sample carries its problem's prompt text and data-file fields for the reward."""
        r = self.cfg
        answers = [p.answer for p in problems]
        if step is not None and self.seeded:
            samples = seeded_generate_groups(self.front, prompts, answers, n=r.samples_per_prompt,
                                             temperature=r.temperature, top_p=r.top_p,
                                             max_new_tokens=r.max_new_tokens, seed=self.seed,
                                             step=step, first_group=first_group, top_k=self.top_k,
                                             routes=self.routes)
        else:
            samples = generate_groups(self.front, prompts, answers, n=r.samples_per_prompt,
                                      temperature=r.temperature, top_p=r.top_p,
                                      max_new_tokens=r.max_new_tokens, first_group_id=first_group,
                                      top_k=self.top_k, routes=self.routes)
        attach_task(samples, problems, r.samples_per_prompt)
        return samples

    def score(self, samples: Sequence[Sample]) -> None:
        """Set each sample's reward (``reward.*``: math-verify, a function or a server, each
        call under a time limit)."""
        self.reward(samples)

    def generate_and_score(self, step: int, next_prompts: NextPrompts
                           ) -> tuple[list[Sample], dict[str, float]]:
        """Boxes 1 + 2 of the loop as one call: generate from the next prompts, reward, apply
        ``rollout.overlong`` and, with ``rollout.dynamic_filter``, repeat until
        ``prompts_per_step`` groups with non-equal rewards are collected
        (:func:`drpo_megatron.rollout.sampling.generate_scored_groups`).  Returns the samples
        (group-major, group ids 0..) and the ``rollout/`` + ``perf/`` sampling metrics."""
        samples, metrics = generate_scored_groups(
            self.cfg, next_prompts=next_prompts, score=self.score,
            generate=lambda p, probs, first: self.generate(p, probs, step=step, first_group=first))
        metrics.update(self.reward.pop_metrics())  # rollout/reward/{timeout,fallback}_count, ...
        return samples, metrics

    def assign_advantages(self, samples: Sequence[Sample]) -> None:
        """Group advantages (``loss.advantage``) of group-major ``samples``."""
        assign_advantages(samples, self.cfg.samples_per_prompt, self.advantage)

    def close(self) -> None:
        """Stop the reward's worker processes."""
        self.reward.close()

    # ---------------------------------------------------------------------- evaluate
    def evaluate(self, *, version: int) -> dict[str, float]:
        """avg@k accuracy on the held-out set at the rollout temperature (the paper's protocol),
        over all problems and per source file (``eval/<source>/avg@k``, e.g. AIME 2024 and
        2025)."""
        t0 = time.time()
        k = self.eval_k
        r = self.cfg
        samples = generate_groups(self.front, self._eval_prompts,
                                  [p.answer for p in self.eval_problems], n=k,
                                  temperature=r.temperature, top_p=r.top_p,
                                  max_new_tokens=r.max_new_tokens)
        attach_task(samples, self.eval_problems, k)
        self.score(samples)
        acc = sum(s.reward for s in samples) / max(len(samples), 1)
        out = {"eval/accuracy": acc, f"eval/avg@{k}": acc,
               **self.reward.pop_metrics("eval/reward/")}
        sources = [getattr(p, "source", "") for p in self.eval_problems]
        if len(set(sources)) > 1:  # samples are group-major: sample i belongs to problem i // k
            for src in sorted(set(sources)):
                rewards = [s.reward for i, s in enumerate(samples) if sources[i // k] == src]
                out[f"eval/{src}/avg@{k}"] = sum(rewards) / len(rewards)
        log.info("eval at weight version %d: %s", version,
                 ", ".join(f"{key[5:]} = {v:.3f}" for key, v in out.items()
                           if key != "eval/accuracy"))
        out["perf/eval_time_s"] = time.time() - t0
        return out
