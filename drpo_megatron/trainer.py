"""The RL loop, top to bottom: generate -> reward -> advantage -> train -> sync -> eval -> save.

Each box is one call into its component; the components are built from the typed
:class:`~drpo_megatron.config.RunConfig` by :func:`build_components`.
"""

from __future__ import annotations

import logging
import time

import torch

from drpo_megatron.config import RunConfig
from drpo_megatron.run import Components, build_components, evaluate, next_prompts

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict[str, float]:
    """Run ``cfg.train.max_steps`` RL steps; returns the last step's metrics."""
    c: Components = build_components(cfg)
    last: dict[str, float] = {}
    try:
        if cfg.train.eval_every:
            c.writers.log_scalars(0, evaluate(c, version=0))
        for step in c.progress(range(1, cfg.train.max_steps + 1)):
            t_step = time.time()
            metrics: dict[str, float] = {}

            # 1. generate: n samples per prompt from SGLang, with per-token log-probs µ
            t0 = time.time()
            prompts, answers = next_prompts(c, cfg.rollout.prompts_per_step)
            samples = c.rollout(prompts, answers, version=step - 1)
            metrics["perf/rollout_time_s"] = time.time() - t0

            # 2. reward (math-verify on \boxed{} answers) and 3. group advantages
            t0 = time.time()
            c.score(samples)
            c.assign_advantages(samples)
            metrics["perf/reward_time_s"] = time.time() - t0
            metrics.update(c.rollout_metrics(samples, current_version=step - 1))
            c.record(step, samples)

            # 4. train: mismatch of the rollout policy vs the trainer, then mini-batch updates
            t0 = time.time()
            metrics.update(c.mismatch(step, samples))
            metrics.update(c.train_on(samples))
            metrics["perf/train_time_s"] = time.time() - t0
            metrics.update(c.throughput(samples, metrics["perf/train_time_s"]))

            # 5. sync weights to the rollout servers (weight_version = step)
            metrics.update(c.transport.push(version=step))

            # 6. eval on the held-out set
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(evaluate(c, version=step))

            metrics["perf/step_time_s"] = time.time() - t_step
            c.writers.log_scalars(step, metrics)
            c.show(step, metrics)
            last = metrics

        # 7. save the final Megatron checkpoint
        c.actor.save_checkpoint(c.run_dir / "checkpoint", step=cfg.train.max_steps)
    finally:
        c.close()
    return last
