"""The RL loop, top to bottom: generate -> reward -> advantage -> train -> sync -> eval -> save.

Each box is one call into its component; the components are built from the typed
:class:`~drpo_megatron.config.RunConfig` by :func:`build_components`.
"""

from __future__ import annotations

import logging
import time

from drpo_megatron.config import RunConfig
from drpo_megatron.operate.preempt import Stopper
from drpo_megatron.run import Components, build_components, evaluate

log = logging.getLogger(__name__)


def save(c: Components, step: int) -> None:
    """Checkpoint: model, optimizer, RNG states, the data cursor and the step (atomic)."""
    t0 = time.time()
    c.actor.save_checkpoint(c.run_dir / "checkpoint", step=step,
                            extra_state={"cursor": c.cursor, "order": list(c.order)})
    log.info("saved checkpoint of step %d in %.1fs", step, time.time() - t0)


def resume(c: Components, cfg: RunConfig) -> int:
    """Load ``<run_dir>/checkpoint`` when ``train.resume`` asks for it; returns the first step
    to run.  The loaded weights go to the rollout servers (weight_version = the checkpoint's
    step) before the first rollout, so step+1 samples from the policy it would have had, and are
    checked there (rollout/verify.py: probe log-probs against the trainer's own forward)."""
    from drpo_megatron.models.megatron_model import find_checkpoint

    if cfg.train.resume == "never":
        return 1
    ckpt = find_checkpoint(c.run_dir / "checkpoint")
    if ckpt is None:
        if cfg.train.resume == "must":
            raise FileNotFoundError(f"--resume: no checkpoint in {c.run_dir / 'checkpoint'}")
        return 1
    step, extra = c.actor.load_checkpoint(ckpt)
    c.cursor = int(extra.get("cursor", 0))
    c.order = list(extra.get("order", []))
    c.transport.push(version=step)
    if not cfg.rollout.verify_sync:  # (with it, push checked already) drift after resume: loud
        c.transport.verify(step)
    log.info("resumed from %s at step %d (data cursor %d); continuing at step %d", ckpt, step,
             c.cursor, step + 1)
    return step + 1


def train(cfg: RunConfig) -> dict[str, float]:
    """Run RL steps up to ``cfg.train.max_steps``; returns the last step's metrics."""
    stopper = Stopper.from_env()  # preemption requests (drpo_megatron/operate/preempt.py)
    c: Components = build_components(cfg)
    last: dict[str, float] = {}
    try:
        start = resume(c, cfg)
        if cfg.train.eval_every and start == 1:
            c.writers.log_scalars(0, evaluate(c, version=0))
        for step in c.progress(range(start, cfg.train.max_steps + 1)):
            t_step = time.time()
            metrics: dict[str, float] = {}

            # 1-3 run on the driver rank (it talks to SGLang), then go to every training rank
            samples = None
            if c.driver:  # the data cursor that checkpoints save is the driver's
                # 1. generate: n samples per prompt from SGLang, with per-token log-probs µ, and
                # 2. reward them (math-verify on \boxed{} answers; rollout.overlong): one call,
                #    because dynamic sampling (rollout.dynamic_filter) generates more prompts until
                #    enough groups have non-equal rewards; it times both parts
                #    (perf/rollout_time_s, perf/reward_time_s)
                samples, sampling_metrics = c.generate_and_score(step)
                metrics.update(sampling_metrics)

                # 3. group advantages
                c.assign_advantages(samples)
            if c.colocation is not None:  # colocated servers free the GPUs before anyone trains
                metrics.update(c.colocation.release())
            samples = c.share(samples)
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

            # 7. save (every train.save_every steps; always after the last step; and on a stop
            #    request: stop file / SIGTERM / SIGUSR1 -> checkpoint, exit 75, SLURM requeues)
            every = cfg.train.save_every
            stop = c.share(stopper.requested())  # the driver's decision: save is collective
            if stop or step == cfg.train.max_steps or (every and step % every == 0):
                save(c, step)
            if stop and step < cfg.train.max_steps:
                stopper.exit_after_checkpoint(step)
    finally:
        c.close()
        stopper.close()
    return last
