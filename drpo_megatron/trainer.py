"""The RL loop, top to bottom: generate -> reward -> advantage -> train -> sync -> eval -> save.

Each box is one call on a component of the :class:`~drpo_megatron.run.Run` that
:func:`~drpo_megatron.run.build_run` built from the typed config (docs/architecture.md has the
call graph of one step).
"""

from __future__ import annotations

import logging
import time

from drpo_megatron.config import RunConfig
from drpo_megatron.dist import share
from drpo_megatron.errors import NonFiniteError
from drpo_megatron.operate.preempt import Stopper
from drpo_megatron.operate.rundir import rollback_jsonl
from drpo_megatron.rollout.engine import rollout_metrics
from drpo_megatron.rollout.generator import assign_advantages
from drpo_megatron.run import Run, build_run
from drpo_megatron.training.checkpoint import find_checkpoint
from drpo_megatron.training.reference import apply_kl_reward

log = logging.getLogger(__name__)


def save(run: Run, step: int) -> None:
    """Checkpoint: model, optimizer, RNG states, the data cursor and the finished batches not
    trained yet (async), the resolved config (a resume compares it with its own) and the step
    (atomic; a failure raises CheckpointError and leaves
    the previous checkpoint intact)."""
    t0 = time.time()
    data = run.batches.state_dict() if run.batches is not None else run.prompts.state_dict()
    run.actor.save_checkpoint(run.run_dir / "checkpoint", step=step,
                              extra_state={**data, "config": run.cfg.to_dict()})
    log.info("saved checkpoint of step %d in %.1fs", step, time.time() - t0)


def resume(run: Run) -> int:
    """Load ``<run_dir>/checkpoint`` when ``train.resume`` asks for it; returns the first step
    to run.  The loaded weights go to the rollout servers (weight_version = the checkpoint's
    step) before the first rollout, so step+1 samples from the policy it would have had, and are
    checked there (rollout/verify.py: probe log-probs against the trainer's own forward)."""
    mode = run.cfg.train.resume
    ckpt = None if mode == "never" else find_checkpoint(run.run_dir / "checkpoint")
    if ckpt is None:
        if mode == "must":
            raise FileNotFoundError(f"--resume: no checkpoint in {run.run_dir / 'checkpoint'}")
        return 1
    step, extra = run.actor.load_checkpoint(ckpt)
    if run.batches is not None:  # the cursor, and the batches generated but not trained yet
        run.batches.load_state_dict(extra, run.prompts.load_state_dict)
    else:
        run.prompts.load_state_dict(extra)
    if run.driver:  # steps after the checkpoint run again: each is recorded once
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            dropped = rollback_jsonl(run.run_dir / name, step)
            if dropped:
                log.info("%s: dropped %d records of steps after %d (they run again)", name,
                         dropped, step)
    run.sync.push(version=step)
    if not run.cfg.rollout.verify_sync:  # (with it, push checked already) drift after resume: loud
        run.sync.verify(step)
    log.info("resumed from %s at step %d (data cursor %d); continuing at step %d", ckpt, step,
             run.prompts.cursor, step + 1)
    return step + 1


def train(cfg: RunConfig) -> dict[str, float]:
    """Run RL steps up to ``cfg.train.max_steps``; returns the last step's metrics."""
    stopper = Stopper.from_env()  # preemption requests (drpo_megatron/operate/preempt.py)
    try:
        with stopper.during_startup():  # a signal now stops at once: nothing to checkpoint yet
            run = build_run(cfg)
    except BaseException:
        stopper.close()
        raise
    last: dict[str, float] = {}
    old_policy_anchor = cfg.loss.policy.anchor == "old_policy"
    kl, correction = cfg.loss.kl, cfg.loss.correction.kind != "none"
    nonfinite_streak = 0
    try:
        with stopper.during_startup():
            start = resume(run)
            if cfg.train.eval_every and start == 1 and run.driver:
                run.writers.log_scalars(0, run.rollout.evaluate(version=0))
            if run.driver:  # async: the producer starts on the next batches now
                run.batches.start(start, cfg.train.max_steps, version=start - 1)
        for step in run.progress.steps(range(start, cfg.train.max_steps + 1)):
            t_step = time.time()
            metrics: dict[str, float] = {}

            # 1-3 run on the driver rank (it talks to SGLang), then go to every training rank:
            # 1. generate: n samples per prompt from SGLang, with per-token log-probs µ,
            # 2. reward them (math-verify on \boxed{} answers; rollout.overlong; dynamic sampling
            #    generates more prompts until enough groups have non-equal rewards), and
            # 3. group advantages: one batch, made now (rollout.mode sync) or by the producer
            #    while the previous steps trained (async, at most rollout.max_staleness weight
            #    versions old); perf/rollout_time_s, perf/reward_time_s, perf/trainer_wait_s
            samples = None
            if run.driver:
                samples, sampling_metrics = run.batches.get(step)
                metrics.update(sampling_metrics)
            if run.colocation is not None:  # colocated servers free the GPUs before anyone trains
                metrics.update(run.colocation.release())
            samples = share(samples)
            metrics.update(rollout_metrics(samples, current_version=str(step - 1)))
            if kl.in_reward and kl.enabled:  # reward - coef * KL(µ || ref), advantages again
                metrics.update(apply_kl_reward(
                    samples, run.reference.compute_logprobs(samples), kl,
                    lambda ss: assign_advantages(ss, cfg.rollout.samples_per_prompt,
                                                 cfg.loss.advantage)))
            run.recorder.record(step, samples)

            # 4. train: π of the samples before any update (the mismatch monitor's input, and
            #    π_old when the loss is anchored on the old policy), then the mini-batch updates
            t0 = time.time()
            logp = run.actor.compute_logprobs(samples)
            metrics.update(run.monitor.measure(step, samples, logp,
                                               routes=run.actor.recorded_routes()))  # R3
            ref_logp = run.reference.compute_logprobs(samples) if kl.in_loss else None
            metrics.update(run.actor.train_on(
                samples, anchor_logp=logp if old_policy_anchor else None, ref_logp=ref_logp,
                old_logp=logp if correction else None))  # the correction's ρ = π_old / µ
            metrics["perf/train_time_s"] = time.time() - t0
            metrics.update(run.throughput.measure(
                [len(s.prompt_ids) + len(s.response_ids) for s in samples],
                metrics["perf/train_time_s"]))

            # 5. sync weights to the rollout servers (weight_version = step)
            metrics.update(run.sync.push(version=step))
            if run.driver:
                run.batches.published(step)  # async: the producer may start the next batch

            # 6. eval on the held-out set
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and run.driver:
                metrics.update(run.rollout.evaluate(version=step))

            metrics["perf/step_time_s"] = time.time() - t_step
            if run.driver:
                metrics["perf/engine_idle_frac"] = run.batches.engine_idle_frac(
                    metrics["perf/step_time_s"])
            run.writers.log_scalars(step, metrics)
            run.progress.show(step, metrics)
            last = metrics
            skipped = int(metrics.get("loss/nonfinite_skipped", 0))
            nonfinite_streak = nonfinite_streak + skipped if skipped else 0
            if nonfinite_streak > cfg.train.max_nonfinite_updates:
                raise NonFiniteError(
                    f"step {step}: {nonfinite_streak} optimizer updates in a row had a non-finite "
                    f"loss or gradient (train.max_nonfinite_updates={cfg.train.max_nonfinite_updates})"
                    "; they were skipped, the weights are finite and the last checkpoint in "
                    f"{run.run_dir / 'checkpoint'} is intact; fix: lower optim.lr, check the loss "
                    "parameters (a tiny delta overflows the weights), or inspect metrics.jsonl")

            # 7. save (every train.save_every steps; always after the last step; and on a stop
            #    request: stop file / SIGTERM / SIGUSR1 -> checkpoint, exit 75, SLURM requeues)
            every = cfg.train.save_every
            stop = share(stopper.requested())  # the driver's decision: save is collective
            if stop or step == cfg.train.max_steps or (every and step % every == 0):
                save(run, step)
            if stop and step < cfg.train.max_steps:
                stopper.exit_after_checkpoint(step)
    finally:
        run.close()
        stopper.close()
    return last
