"""Builds everything a run needs from its config, and the small glue steps of the loop.

``build_components`` validates first (cheap), then starts the expensive parts in order: run
directory + logging, policy checkpoint, process groups + Megatron actor, SGLang server, writers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from drpo_megatron.config import RunConfig
from drpo_megatron.rollout.engine import Sample, generate_groups, rollout_metrics

log = logging.getLogger("drpo")

# SGLang uses a request's sampling_seed only in deterministic mode (on CPU see platform/sglang_cpu)
DETERMINISTIC_FLAG = "--enable-deterministic-inference"


def setup_run_dir(cfg: RunConfig) -> Path:
    """Create ``output_dir`` with ``config.yaml`` (resolved) and ``logs/trainer.log`` (rank 0;
    the other training ranks log to ``logs/trainer-rank<r>.log``)."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # before the process group exists
    if rank == 0:
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    fh = logging.FileHandler(run_dir / "logs" / ("trainer.log" if rank == 0 else
                                                 f"trainer-rank{rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    # Megatron logs every parameter of every bucket at INFO; keep its warnings only.
    for name in ("megatron.core", "megatron.bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return run_dir


@dataclass
class Components:
    cfg: RunConfig
    run_dir: Path
    tokenizer: Any
    train_set: list
    eval_set: list
    actor: Any
    servers: list
    transport: Any
    writers: Any
    reward_fn: Any
    pad_id: int
    flops_model: Any = None
    peak_flops: float = float("nan")
    cursor: int = 0
    order: list = field(default_factory=list)
    driver: bool = True  # this rank drives SGLang, scores, logs (training/ranks.py)
    colocation: Any = None  # rollout/colocate.Colocation when the servers share the GPUs
    _bar: Any = None
    _old_logp: Any = None

    # -------------------------------------------------------------- loop steps
    def share(self, value):
        """The driver rank's ``value`` (its samples with rewards and advantages, a stop
        decision ...) on every training rank (collective; identity with one process)."""
        from drpo_megatron.training.ranks import share

        return share(value)

    def rollout(self, prompts, answers, *, version: int, step: int | None = None,
                first_group: int = 0) -> list[Sample]:
        """``samples_per_prompt`` samples of each prompt, group-major, group ids from
        ``first_group`` (the step-local index of ``prompts[0]``: seeds stay distinct across
        dynamic-sampling rounds); with µ's top-K log-probs when the loss needs them."""
        r = self.cfg.rollout
        if step is not None and self.cfg.train.seeded_rollouts:
            return seeded_generate_groups(self.servers[0], prompts, answers, n=r.samples_per_prompt,
                                          temperature=r.temperature, top_p=r.top_p,
                                          max_new_tokens=r.max_new_tokens,
                                          seed=self.cfg.train.seed, step=step,
                                          first_group=first_group, top_k=self.rollout_top_k)
        samples = generate_groups(self.servers[0], prompts, answers, n=r.samples_per_prompt,
                                  temperature=r.temperature, top_p=r.top_p,
                                  max_new_tokens=r.max_new_tokens, first_group_id=first_group,
                                  top_k=self.rollout_top_k)
        return samples

    def generate_and_score(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Boxes 1 + 2 of the loop as one call: generate from the next prompts, reward, apply
        ``rollout.overlong`` and, with ``rollout.dynamic_filter``, repeat until
        ``prompts_per_step`` groups with non-equal rewards are collected
        (:func:`drpo_megatron.rollout.sampling.generate_scored_groups`).  Returns the samples
        (group-major, group ids 0..) and the ``rollout/`` + ``perf/`` sampling metrics."""
        from drpo_megatron.rollout.sampling import generate_scored_groups

        return generate_scored_groups(
            self.cfg.rollout, next_prompts=lambda k: next_prompts(self, k), score=self.score,
            generate=lambda p, a, first: self.rollout(p, a, version=step - 1, step=step,
                                                      first_group=first))

    @property
    def rollout_top_k(self) -> int:
        """K of µ's top-K log-probs to request: the loss's ``top_k`` when it needs them
        (``LOSS_EXTRAS`` has ``topk_logp``: DPPO top-K), else 0."""
        from drpo_megatron.algorithms import make_loss_config
        from drpo_megatron.algorithms.losses import LOSS_EXTRAS

        if "topk_logp" not in LOSS_EXTRAS.get(self.cfg.loss.name, ()):
            return 0
        k = int(make_loss_config(self.cfg.loss.name, self.cfg.loss.params).top_k)
        if k > len(self.tokenizer):
            raise ValueError(f"loss.params.top_k={k} exceeds the vocabulary ({len(self.tokenizer)} "
                             "tokens): SGLang's scheduler dies on it; lower top_k")
        return k

    def record(self, step: int, samples: Sequence[Sample]) -> None:
        """Append the step's samples (ids, µ, reward, advantage, version) to rollouts.jsonl."""
        if not self.driver:
            return
        with open(self.run_dir / "rollouts.jsonl", "a") as fh:
            for s in samples:
                fh.write(json.dumps({"step": step, "group_id": s.group_id, "prompt_ids": s.prompt_ids,
                                     "response_ids": s.response_ids, "rollout_logp": s.rollout_logp,
                                     "text": s.text, "answer": s.answer, "reward": s.reward,
                                     "advantage": s.advantage, "finish_reason": s.finish_reason,
                                     "weight_version": s.weight_version, "in_loss": s.in_loss,
                                     "meta": s.meta}) + "\n")

    def score(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            s.reward = self.reward_fn(s.text, s.answer)

    def assign_advantages(self, samples: Sequence[Sample]) -> None:
        from drpo_megatron.algorithms import compute_advantages

        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        adv = compute_advantages(rewards, self.cfg.rollout.samples_per_prompt,
                                 estimator=self.cfg.loss.advantage)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

    def rollout_metrics(self, samples, current_version: int) -> dict[str, float]:
        return rollout_metrics(samples, current_version=str(current_version))

    def mismatch(self, step: int, samples: Sequence[Sample]) -> dict[str, float]:
        """Trainer log-probs (before this step's updates) vs the rollout engine's µ; scalars are
        returned, per-token distributions go to the writers' histograms."""
        from drpo_megatron.mismatch import compute_mismatch_metrics, mismatch_histogram_tensors

        logp = self.actor.compute_logprobs(samples, self.pad_id)
        self._old_logp = logp  # π_old: the anchor when the loss config says anchor: old_policy
        flat = torch.cat(logp)
        mu = torch.cat([torch.tensor(s.rollout_logp, dtype=torch.float32) for s in samples])
        seq = torch.cat([torch.full((len(s.rollout_logp),), i) for i, s in enumerate(samples)])
        adv = torch.cat([torch.full((len(s.rollout_logp),), s.advantage) for s in samples])
        delta = float(self.cfg.loss.params.get("delta", 12.5))
        mask = torch.ones_like(flat, dtype=torch.bool)
        metrics = compute_mismatch_metrics(flat, mu, mask, seq_ids=seq, advantages=adv, delta=delta)
        self.writers.log_histograms(step, mismatch_histogram_tensors(flat, mu, mask, advantages=adv,
                                                                     delta=delta))
        return metrics

    def train_on(self, samples: Sequence[Sample]) -> dict[str, float]:
        """``optim.updates_per_rollout`` optimizer steps, each on whole prompt groups.

        The anchor is the rollout's µ unless the loss config says ``anchor: old_policy``; then it
        is π_old recomputed by :meth:`mismatch` before any update of this step (never a silent
        switch: the choice is the loss config's ``anchor`` field)."""
        k = self.cfg.optim.updates_per_rollout
        per = len(samples) // k  # whole groups: prompts_per_step is divisible by k
        old_policy = self.actor.loss_cfg.anchor == "old_policy"
        reports = []
        for u in range(k):
            sl = slice(u * per, (u + 1) * per)
            reports.append(self.actor.train_step(
                samples[sl], self.pad_id, anchor_logp=self._old_logp[sl] if old_policy else None))
        out: dict[str, float] = {}
        for key in reports[0]:
            vals = [r[key] for r in reports if key in r]
            out[key] = sum(vals) / len(vals)
        out["loss/policy_loss_first_update"] = reports[0].get("loss/policy_loss", float("nan"))
        return out

    def throughput(self, samples: Sequence[Sample], train_time_s: float) -> dict[str, float]:
        """tokens/s per device and MFU of the train phase (training/flops.py's convention).

        Every sample is trained once (mini-batches are disjoint) after one forward for the
        mismatch log-probs: 1 + 1/3 fwd+bwd passes per token."""
        from drpo_megatron.training.flops import throughput_metrics

        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = throughput_metrics(self.flops_model, tokens=sum(lengths),
                                 seq_len=round(sum(lengths) / len(lengths)), seconds=train_time_s,
                                 num_devices=world, peak_flops=self.peak_flops, passes=4 / 3)
        out["perf/train_tokens"] = float(sum(lengths))
        return out

    # -------------------------------------------------------------- progress / teardown
    def progress(self, it):
        from tqdm import tqdm

        self._bar = tqdm(it, desc="DRPO steps", unit="step", dynamic_ncols=True,
                         disable=not self.driver or (not sys.stderr.isatty()
                                                     and os.environ.get("DRPO_PROGRESS") != "1"))
        return self._bar

    def show(self, step: int, metrics: dict[str, float]) -> None:
        if not self.driver:
            return
        msg = (f"step {step}: reward {metrics.get('rollout/reward_mean', float('nan')):.3f} "
               f"loss {metrics.get('loss/policy_loss', float('nan')):+.4f} "
               f"|logp-mu| {metrics.get('mismatch/logprob_abs_diff', float('nan')):.2e} "
               f"{metrics.get('perf/step_time_s', 0):.1f}s")
        if "eval/accuracy" in metrics:
            msg += f" eval {metrics['eval/accuracy']:.3f}"
        log.info(msg)
        if self._bar is not None:
            self._bar.set_postfix(reward=f"{metrics.get('rollout/reward_mean', 0):.3f}")

    def close(self) -> None:
        # the transport first (the distributed one holds a process group with the servers), then
        # the front: servers we launched and the router (an external router's are left alone)
        close = getattr(self.transport, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                log.warning("closing the weight transport: %s", e)
        for s in self.servers:
            s.stop()
        if self.writers is not None:
            self.writers.close()


def sampling_seed(seed: int, step: int, group: int, sample: int) -> int:
    """SGLang ``sampling_seed`` of one sample: a 31-bit hash of (train.seed, step, prompt index
    in the step, sample index in the group); distinct per sample, identical across restarts."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{step}:{group}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded_generate_groups(server, prompts, answers, *, n: int, temperature: float, top_p: float,
                           max_new_tokens: int, seed: int, step: int, first_group: int = 0,
                           top_k: int = 0) -> list[Sample]:
    """Like ``generate_groups`` (group-major, ``len(prompts) * n`` samples) with one request
    per sample, each with its own ``sampling_seed``: SGLang seeds a request's sampling by
    (seed, position), so the n samples of a prompt must not share one seed (they would be
    identical).  ``first_group``: step-local index of ``prompts[0]`` (its group id and seed
    index); ``top_k`` > 0 also requests µ's top-K log-probs."""
    from drpo_megatron.rollout.engine import parse_sample
    from drpo_megatron.rollout.server import ServerError

    ids, params = [], []
    for g, p in enumerate(prompts):
        for k in range(n):
            ids.append(list(p))
            params.append({"n": 1, "temperature": temperature, "top_p": top_p,
                           "max_new_tokens": max_new_tokens,
                           "sampling_seed": sampling_seed(seed, step, first_group + g, k)})
    outs = server.generate(ids, params, return_logprob=True, top_logprobs_num=top_k)
    if len(outs) != len(ids):
        raise ServerError(f"{server.name}: /generate returned {len(outs)} outputs for "
                          f"{len(ids)} seeded requests")
    return [parse_sample(out, group_id=first_group + i // n, prompt_ids=prompts[i // n],
                         answer=answers[i // n], server_name=server.name, top_k=top_k)
            for i, out in enumerate(outs)]


def next_prompts(c: Components, k: int) -> tuple[list[list[int]], list[str]]:
    """The next ``k`` training problems (reshuffled every epoch), as token ids + answers."""
    from drpo_megatron.data.math import encode_prompt

    prompts, answers = [], []
    for _ in range(k):
        if c.cursor % len(c.train_set) == 0:
            rng = random.Random(c.cfg.train.seed + c.cursor // len(c.train_set))
            c.order = list(range(len(c.train_set)))
            rng.shuffle(c.order)
        p = c.train_set[c.order[c.cursor % len(c.train_set)]]
        c.cursor += 1
        prompts.append(encode_prompt(c.tokenizer, p.prompt_text))
        answers.append(p.answer)
    return prompts, answers


def evaluate(c: Components, *, version: int) -> dict[str, float]:
    """avg@k accuracy on the held-out set at the rollout temperature (the paper's protocol), over
    all problems and per source file (``eval/<source>/avg@k``, e.g. AIME 2024 and 2025); run by
    the driver rank (the others return no metrics)."""
    from drpo_megatron.data.math import encode_prompt

    if not c.driver:
        return {}
    t0 = time.time()
    k = c.cfg.train.eval_samples_per_prompt
    r = c.cfg.rollout
    prompts = [encode_prompt(c.tokenizer, p.prompt_text) for p in c.eval_set]
    samples = generate_groups(c.servers[0], prompts, [p.answer for p in c.eval_set], n=k,
                              temperature=r.temperature, top_p=r.top_p,
                              max_new_tokens=r.max_new_tokens)
    c.score(samples)
    acc = sum(s.reward for s in samples) / max(len(samples), 1)
    out = {"eval/accuracy": acc, f"eval/avg@{k}": acc}
    sources = [getattr(p, "source", "") for p in c.eval_set]
    if len(set(sources)) > 1:  # samples are group-major: sample i belongs to problem i // k
        for src in sorted(set(sources)):
            rewards = [s.reward for i, s in enumerate(samples) if sources[i // k] == src]
            out[f"eval/{src}/avg@{k}"] = sum(rewards) / len(rewards)
    log.info("eval at weight version %d: %s", version,
             ", ".join(f"{key[5:]} = {v:.3f}" for key, v in out.items() if key != "eval/accuracy"))
    out["perf/eval_time_s"] = time.time() - t0
    return out


def build_components(cfg: RunConfig) -> Components:
    from drpo_megatron.algorithms import make_loss_config
    from drpo_megatron.data.math import encode_prompt, load_task
    from drpo_megatron.mismatch.writers import build_writers
    from drpo_megatron.models.megatron_model import init_distributed
    from drpo_megatron.models.tiny import ensure_tiny_checkpoint
    from drpo_megatron.rewards import build_reward
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.ranks import is_driver
    from drpo_megatron.weights.transport import WEIGHT_TRANSPORTS, build_transport

    # cheap checks first: nothing below starts before these pass
    make_loss_config(cfg.loss.name, cfg.loss.params)
    reward_fn = build_reward("math_verify_boxed")
    if cfg.rollout.weight_transport not in WEIGHT_TRANSPORTS:
        build_transport(cfg.rollout.weight_transport, None, [], ".")  # raises the clear error
    check_world_size(cfg)

    run_dir = setup_run_dir(cfg)
    par = cfg.parallel
    init_distributed(par.tp, par.pp, par.ep, etp=par.etp, seed=cfg.train.seed)
    driver = is_driver()
    torch.manual_seed(cfg.train.seed)
    if cfg.model.hf_path:
        policy = Path(cfg.model.hf_path).expanduser()
    else:  # the driver builds the embedded checkpoint (once, cached); the others then reuse it
        if driver:
            policy = ensure_tiny_checkpoint(cfg.model.cache_dir, cfg.model.tiny,
                                            max_operand=cfg.task.max_operand)
        torch.distributed.barrier()
        if not driver:
            policy = ensure_tiny_checkpoint(cfg.model.cache_dir, cfg.model.tiny,
                                            max_operand=cfg.task.max_operand)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    train_set, eval_set = load_task(cfg.task, tokenizer)  # data/arithmetic.py or data/math.py

    # the driver rank starts the servers first: they load while the actor builds
    if cfg.train.seeded_rollouts and torch.cuda.is_available() and \
            DETERMINISTIC_FLAG not in cfg.rollout.server.extra_args:
        cfg.rollout.server.extra_args.append(DETERMINISTIC_FLAG)  # sampling_seed needs it on GPU
    # server logs: <output_dir>/logs, or the SLURM job's log dir (slurm/*.sbatch.tmpl export it)
    server_logs = Path(os.environ.get("DRPO_SERVER_LOG_DIR") or run_dir / "logs")
    # (rollout/router.py: N servers, sglang-router in front when N > 1, or an external router)
    from drpo_megatron.rollout import router as rr
    from drpo_megatron.training.flops import FlopsModel, device_peak_flops
    from drpo_megatron.training.ranks import world_size

    rollout = rr.RolloutSetup(cfg.rollout, policy, server_logs, driver)
    from drpo_megatron.rollout import colocate

    colocation = colocate.setup(cfg, rollout.servers, driver=driver)  # None unless colocated
    transport = None
    try:  # whatever fails from here on, the servers and the router we started are stopped
        rollout.start()
        if colocation is not None:  # servers size their KV pool from the free GPU memory:
            rollout.wait_ready()    # they load before any trainer rank allocates
            torch.distributed.barrier()
        actor = MegatronActor(actor_config(cfg, policy))
        if colocation is None:
            rollout.wait_ready()  # every server healthy at version "0" (and registered)
        servers = rollout.servers
        flops_model = FlopsModel.from_hf_config(json.loads((policy / "config.json").read_text()))
        device, peak = device_peak_flops("bf16")
        log.info("MFU is relative to %s peak %.3g FLOP/s", device, peak)
        writers = build_writers(cfg.logging.writers if driver else [], run_dir)
        base = transport = build_transport(cfg.rollout.weight_transport, actor, servers,
                                           run_dir / "weights", precision=cfg.rollout.precision,
                                           bucket_mb=cfg.rollout.weight_bucket_mb)
        transport = rollout.wrap(transport)  # every push bracketed by pause (abort) ... continue
        if colocation is not None:  # resume weights -> push -> resume KV cache
            transport = colocate.ColocatedTransport(transport, colocation)
        # the post-sync check: after every push with rollout.verify_sync, always after a resume
        from drpo_megatron.rollout.verify import DEFAULT_ATOL, VerifiedTransport, actor_reference

        transport = VerifiedTransport(
            transport, servers, encode_prompt(tokenizer, eval_set[0].prompt_text),
            actor_reference(actor, tokenizer.pad_token_id),
            atol=cfg.rollout.verify_sync_atol or DEFAULT_ATOL[cfg.rollout.precision],
            every_push=cfg.rollout.verify_sync)
        if cfg.rollout.precision != "bf16":
            transport.push(version=0)  # the server loaded unquantized weights: push version 0 as FP8
        # the loop talks to one server, a Fleet or a RouterFleet alike (None on non-driver
        # ranks); a restarted server is re-synced to the last pushed version before it takes
        # requests: through a one-server transport (one trainer process), from the newest disk
        # export (several ranks: a push is collective), or not at all (a clear error)
        if world_size() == 1:
            resync = rr.one_server_resync(lambda ss: build_transport(
                cfg.rollout.weight_transport, actor, ss, run_dir / "weights-resync",
                precision=cfg.rollout.precision, bucket_mb=cfg.rollout.weight_bucket_mb))
        elif cfg.rollout.weight_transport == "disk":
            resync = rr.export_dir_resync(lambda: base.latest)
        else:
            resync = rr.collective_only_resync(cfg.rollout.weight_transport, world_size())
        front = rollout.front(resync, max_attempts=cfg.rollout.max_attempts)
    except BaseException:
        if transport is not None and hasattr(transport, "close"):
            transport.close()
        rollout.stop()
        raise
    return Components(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, train_set=train_set,
                      eval_set=eval_set, actor=actor, servers=[front] if driver else [],
                      transport=transport, writers=writers, reward_fn=reward_fn,
                      pad_id=tokenizer.pad_token_id, flops_model=flops_model, peak_flops=peak,
                      driver=driver, colocation=colocation)


def check_world_size(cfg: RunConfig) -> None:
    """The processes this run was launched with must be the layout's world
    (``parallel.num_nodes * parallel.gpus_per_node``), checked before anything starts."""
    from drpo_megatron.config import ConfigError

    par = cfg.parallel
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != par.world_size:
        raise ConfigError(
            f"parallel.num_nodes*gpus_per_node={par.world_size} (tp={par.tp}, pp={par.pp}, "
            f"ep={par.ep}) but this run has WORLD_SIZE={launched} processes; launch it with "
            f"`torchrun --nproc-per-node {par.gpus_per_node} -m drpo_megatron.cli train ...` on "
            f"{par.num_nodes} node(s), or set parallel.gpus_per_node: {launched}")


def actor_config(cfg: RunConfig, policy: Path):
    """The Megatron actor's config from the run config (parallel layout, precision, optimizer,
    loss, temperature)."""
    from drpo_megatron.models.megatron_model import recompute_fields
    from drpo_megatron.training.actor import ActorConfig

    par = cfg.parallel
    return ActorConfig(
        hf_path=str(policy), dtype=cfg.model.dtype, fp8=cfg.model.fp8, tp=par.tp, pp=par.pp,
        ep=par.ep, etp=par.etp, sequence_parallel=par.sequence_parallel,
        use_distributed_optimizer=par.use_distributed_optimizer,
        micro_batch_size=par.micro_batch_size, lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
        adam_betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), loss_name=cfg.loss.name,
        loss_params=cfg.loss.params, aggregation=cfg.loss.aggregation, horizon=cfg.loss.horizon,
        temperature=cfg.rollout.temperature, seed=cfg.train.seed,
        model_overrides={**recompute_fields(par.recompute),  # parallel.recompute -> Megatron
                         **({} if cfg.model.moe_aux_loss_coeff is None else
                            {"moe_aux_loss_coeff": cfg.model.moe_aux_loss_coeff})})
