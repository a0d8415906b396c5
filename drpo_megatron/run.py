"""Builds the components of a run from its config; the loop (``trainer.py``) then calls them.

:func:`build_run` starts the expensive parts in order (run directory + logging, policy
checkpoint, process groups, SGLang servers, Megatron actor, writers, weight sync) after the
config was validated, and stops whatever it started when a later part fails.  Each component is
built from its own config section; none of them calls back into this module.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
import yaml
from transformers import AutoTokenizer

from drpo_megatron.algorithms.losses import LOSS_EXTRAS
from drpo_megatron.config import RunConfig, actor_config, check_world_size
from drpo_megatron.data.math import encode_prompt, load_task
from drpo_megatron.data.prompts import PromptStream
from drpo_megatron.dist import barrier, is_driver, world_size
from drpo_megatron.mismatch.monitor import MismatchMonitor
from drpo_megatron.mismatch.writers import MultiWriter, build_writers
from drpo_megatron.models.megatron_model import init_distributed
from drpo_megatron.models.tiny import ensure_tiny_checkpoint
from drpo_megatron.operate.plan import colocated_mem_fraction
from drpo_megatron.operate.rundir import (Progress, RolloutRecorder, check_writable, flatten,
                                          setup_run_dir, unsafe_resume_changes)
from drpo_megatron.rewards.scorer import build_scorer
from drpo_megatron.rollout import colocate
from drpo_megatron.rollout.colocate import ColocatedTransport, Colocation
from drpo_megatron.rollout.generator import RolloutGenerator
from drpo_megatron.rollout.async_rollout import AsyncRollouts, BatchSource, groups_of, problems_of
from drpo_megatron.rollout.partial import PartialFront
from drpo_megatron.rollout.router import RolloutSetup, resolve_router_url, rollout_api_key
from drpo_megatron.rollout.sampling import apply_overlong
from drpo_megatron.rollout.routes import SERVER_FLAG as ROUTES_FLAG
from drpo_megatron.rollout.routes import check_routing_replay_front, route_spec
from drpo_megatron.rollout.verify import DEFAULT_ATOL
from drpo_megatron.schema import ConfigError
from drpo_megatron.training.actor import MegatronActor
from drpo_megatron.training.checkpoint import find_checkpoint, read_trainer_state
from drpo_megatron.training.reference import ReferencePolicy
from drpo_megatron.training.flops import FlopsModel, ThroughputMeter, device_peak_flops
from drpo_megatron.weights.sync import (PausedTransport, VerifiedTransport, actor_reference,
                                        collective_only_resync, export_dir_resync,
                                        one_server_resync)
from drpo_megatron.weights.transport import build_transport

log = logging.getLogger("drpo")

# SGLang uses a request's sampling_seed only in deterministic mode (on CPU see platform/sglang_cpu)
DETERMINISTIC_FLAG = "--enable-deterministic-inference"
ROUTER_PROBE_TIMEOUT_S = 5.0  # one /health probe of an external router before anything starts


def is_driver_process() -> bool:
    """Rank 0 of the launch (before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Run:
    """The components of one run (``prompts`` and ``rollout`` are used on the driver rank only;
    see docs/architecture.md for what each owns)."""

    cfg: RunConfig
    run_dir: Path
    driver: bool
    prompts: PromptStream          # training problems, data cursor (checkpointed)
    rollout: RolloutGenerator | None  # generate, reward, advantages, eval (driver)
    actor: MegatronActor           # log-probs, updates, checkpoints, weight export
    reference: ReferencePolicy | None  # loss.kl: the frozen reference policy (same layout)
    monitor: MismatchMonitor       # mismatch/ metrics of π vs µ
    sync: VerifiedTransport        # weights -> servers (paused, checked)
    writers: MultiWriter           # metrics.jsonl, TensorBoard, W&B (driver)
    recorder: RolloutRecorder      # rollouts.jsonl (driver)
    progress: Progress             # bar + step line (driver)
    throughput: ThroughputMeter    # perf/ tokens/s and MFU
    servers: RolloutSetup          # what was launched (stopped by close)
    batches: BatchSource | None = None    # each step's batch: made now (sync) or by a producer (driver)
    colocation: Colocation | None = None  # servers sharing the trainer's GPUs (rollout/colocate.py)

    def close(self) -> None:
        """The rollout producer first (async), then the transport (the distributed one holds a
        process group with the servers), then the servers and router we launched (an external
        router's are left alone)."""
        if self.batches is not None:
            self.batches.close()
        try:
            self.sync.close()
        except Exception as e:  # noqa: BLE001 - teardown goes on
            log.warning("closing the weight transport: %s", e)
        self.servers.stop()
        if self.rollout is not None:
            self.rollout.close()  # the reward's worker processes
        self.writers.close()


def rollout_top_k(cfg: RunConfig, vocab: int) -> int:
    """K of µ's top-K log-probs to request: the loss's ``top_k`` when it needs them
    (``LOSS_EXTRAS`` has ``topk_logp``: DPPO top-K), else 0."""
    if "topk_logp" not in LOSS_EXTRAS.get(cfg.loss.name, ()):
        return 0
    k = int(cfg.loss.policy.top_k)
    if k > vocab:
        raise ConfigError(f"loss.params.top_k={k} exceeds the vocabulary ({vocab} tokens): "
                          "SGLang's scheduler dies on it; lower top_k")
    return k


def policy_checkpoint(cfg: RunConfig, driver: bool) -> Path:
    """The initial policy's HF directory: ``model.hf_path``, or the embedded tiny checkpoint
    (built once by the driver, cached; the other ranks then reuse it)."""
    if cfg.model.hf_path:
        return Path(cfg.model.hf_path).expanduser()
    policy = None
    if driver:
        policy = ensure_tiny_checkpoint(cfg.model.cache_dir, cfg.model.tiny,
                                        max_operand=cfg.task.max_operand)
    barrier()
    if not driver:
        policy = ensure_tiny_checkpoint(cfg.model.cache_dir, cfg.model.tiny,
                                        max_operand=cfg.task.max_operand)
    return policy


def preflight(cfg: RunConfig) -> None:
    """What can be checked of the machine before anything starts (rank 0): the run directory is
    writable, a resume does not change what the run is (before config.yaml is overwritten), a
    fixed server port is free, an external router answers."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    check_writable(run_dir)
    if cfg.train.resume != "never":
        ckpt = find_checkpoint(run_dir / "checkpoint")
        if ckpt is None and cfg.train.resume == "must":
            raise ConfigError(f"--resume (train.resume=must): no checkpoint in "
                              f"{run_dir / 'checkpoint'}; drop --resume to start a new run there, or "
                              "point --output-dir at the run to continue")
        if ckpt is not None:
            old = read_trainer_state(ckpt).get("config")
            if old is None and (run_dir / "config.yaml").exists():  # checkpoints before the config
                old = yaml.safe_load((run_dir / "config.yaml").read_text())  # was saved in them
            changes = (unsafe_resume_changes(old, cfg.to_dict(), flatten(RunConfig().to_dict()))
                       if old else [])
            if changes:
                raise ConfigError(
                    f"resume from {ckpt}: this config changes what the run is:\n  "
                    + "\n  ".join(changes) + "\nfix: restore those values to resume, or start a "
                    "new run with another --output-dir (or --set train.resume=never to start over "
                    "here, replacing the checkpoint at the next save)")
    port, host = cfg.rollout.server.port, cfg.rollout.server.host
    if port and not resolve_router_url(cfg.rollout)[0]:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"rollout.server.port={port}: cannot listen on {host}:{port} "
                              f"({e.strerror}); choose a free port, or 0 to pick one") from None
    url, source = resolve_router_url(cfg.rollout)
    try:  # routing replay behind sglang-router (an external one may come from the environment)
        check_routing_replay_front(cfg.rollout.routing_replay, num_servers=cfg.rollout.num_servers,
                                   router=cfg.rollout.router, router_url=url,
                                   router_url_from=source)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if url:
        try:
            requests.get(url.rstrip("/") + "/health", timeout=ROUTER_PROBE_TIMEOUT_S)
        except requests.ConnectionError as e:
            if "refused" in str(e).lower() or "Name or service not known" in str(e):
                raise ConfigError(
                    f"{source}={url}: nothing answers there ({str(e).splitlines()[0][:160]}); start "
                    "the router first, fix the URL, or unset it to let drpo launch the servers"
                ) from None
        except requests.RequestException:
            pass  # slow or busy: RolloutSetup waits for it (rollout.server.startup_timeout_s)


def build_run(cfg: RunConfig) -> Run:
    """Every component of the run, built in the order that lets servers load while the actor
    builds; whatever fails after the servers started stops them again."""
    check_world_size(cfg)  # cheap checks first: nothing below starts before these
    if is_driver_process():
        preflight(cfg)

    run_dir = setup_run_dir(cfg.output_dir, cfg.to_dict())
    par = cfg.parallel
    init_distributed(par.tp, par.pp, par.ep, etp=par.etp, seed=cfg.train.seed)
    driver = is_driver()
    torch.manual_seed(cfg.train.seed)
    policy = policy_checkpoint(cfg, driver)
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    train_set, eval_set = load_task(cfg.task, tokenizer)  # data/arithmetic.py or data/math.py
    top_k = rollout_top_k(cfg, len(tokenizer))
    try:  # routing replay (R3): the routes' shape; the servers keep every token's experts
        routes = route_spec(cfg.rollout.routing_replay, policy)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if routes is not None and ROUTES_FLAG not in cfg.rollout.server.extra_args:
        cfg.rollout.server.extra_args.append(ROUTES_FLAG)

    if cfg.train.seeded_rollouts and torch.cuda.is_available() and \
            DETERMINISTIC_FLAG not in cfg.rollout.server.extra_args:
        cfg.rollout.server.extra_args.append(DETERMINISTIC_FLAG)  # sampling_seed needs it on GPU
    # server logs: <output_dir>/logs, or the SLURM job's log dir (slurm/*.sbatch.tmpl export it)
    server_logs = Path(os.environ.get("DRPO_SERVER_LOG_DIR") or run_dir / "logs")
    setup = RolloutSetup(cfg.rollout, policy, server_logs, driver,
                         api_key=rollout_api_key(cfg.rollout, run_dir) if driver else None)
    colocation = colocate.setup(cfg, setup.servers, driver=driver,  # None unless colocated
                                mem_fraction=colocated_mem_fraction)
    sync = scorer = None
    try:  # whatever fails from here on, the servers and the router we started are stopped
        # reward.*: the driver probes an HTTP reward server now, before anything expensive
        scorer = build_scorer(cfg.reward, probe=driver) if driver else None
        setup.start()  # the driver rank starts the servers first: they load while the actor builds
        if colocation is not None:  # servers size their KV pool from the free GPU memory:
            setup.wait_ready()      # they load before any trainer rank allocates
            barrier()
        actor = MegatronActor(actor_config(cfg, policy), pad_id=tokenizer.pad_token_id)
        reference = None
        if cfg.loss.kl.enabled:  # loss.kl: a frozen reference in the actor's layout
            reference = ReferencePolicy(actor.cfg, cfg.loss.kl.ref_path or str(policy),
                                        pad_id=tokenizer.pad_token_id)
        if colocation is None:
            setup.wait_ready()  # every server healthy at version "0" (and registered)
        device, peak = device_peak_flops("bf16")
        log.info("MFU is relative to %s peak %.3g FLOP/s", device, peak)
        throughput = ThroughputMeter(
            FlopsModel.from_hf_config(json.loads((policy / "config.json").read_text())), peak,
            world_size())
        writers = build_writers(cfg.logging.writers if driver else [], run_dir)
        sync = build_sync(cfg, actor, setup, run_dir, colocation,
                          probe_ids=encode_prompt(tokenizer, eval_set[0].prompt_text))
        front = setup.front(resync_strategy(cfg, actor, run_dir, sync),
                            current_version=lambda: sync.version,
                            max_attempts=cfg.rollout.max_attempts)
    except BaseException:
        if sync is not None:
            sync.close()
        if scorer is not None:
            scorer.close()
        setup.stop()
        raise
    rollout = batches = None
    prompts = PromptStream(train_set, tokenizer, seed=cfg.train.seed)
    if cfg.rollout.partial_rollouts:  # responses cut by a push continue on the new weights
        front = PartialFront(front)
    if driver:
        rollout = RolloutGenerator(cfg.rollout, front, scorer,
                                   advantage=cfg.loss.advantage, seed=cfg.train.seed,
                                   seeded=cfg.train.seeded_rollouts, top_k=top_k,
                                   eval_problems=eval_set,
                                   eval_k=cfg.train.eval_samples_per_prompt, tokenizer=tokenizer,
                                   routes=routes)
        batches = build_batch_source(cfg, rollout, prompts)
    return Run(cfg=cfg, run_dir=run_dir, driver=driver, prompts=prompts, rollout=rollout,
               actor=actor, reference=reference, monitor=MismatchMonitor(cfg.loss.policy, writers), sync=sync,
               writers=writers, recorder=RolloutRecorder(run_dir, enabled=driver),
               progress=Progress(enabled=driver), throughput=throughput, servers=setup,
               batches=batches, colocation=colocation)


#: ``first_group`` of a regenerated stale group: its sampling seeds never repeat a fresh group's
REGENERATED_FIRST_GROUP = 1_000_000


def build_batch_source(cfg: RunConfig, rollout: RolloutGenerator, prompts: PromptStream
                       ) -> BatchSource:
    """Where each step's batch comes from (rollout.mode, rollout/async_rollout.py): boxes 1-3 of
    the loop (generate, reward, advantages) as ``produce(step)``; each sample is numbered by its
    prompt draw (``meta["prompt_index"]``: the data cursor of its prompt)."""
    r = cfg.rollout

    def produce(step: int):
        first = prompts.cursor
        samples, metrics = rollout.generate_and_score(step, prompts.next)
        for s in samples:
            s.meta["prompt_index"] = first + s.meta["generated_group"]
        rollout.assign_advantages(samples)
        return samples, metrics

    def regenerate(step: int, groups):
        new = rollout.generate([g[0].prompt_ids for g in groups], problems_of(groups), step=step,
                               first_group=REGENERATED_FIRST_GROUP)
        rollout.score(new)
        apply_overlong(new, r)
        fresh = groups_of(new)
        for old, grp in zip(groups, fresh):
            for smp in grp:
                smp.meta.update({k: old[0].meta[k] for k in ("prompt_index", "generated_group")
                                 if k in old[0].meta})
        rollout.assign_advantages(new)
        return fresh

    kw = dict(cursor_state=prompts.state_dict, stale_policy=r.stale_policy, regenerate=regenerate)
    if r.mode == "async":
        return AsyncRollouts(produce, max_staleness=r.max_staleness, **kw)
    return BatchSource(produce, max_staleness=0, **kw)


def build_sync(cfg: RunConfig, actor: MegatronActor, setup: RolloutSetup, run_dir: Path,
               colocation: Colocation | None, *, probe_ids: list[int]) -> VerifiedTransport:
    """The weight sync of the run: the configured transport to every server, each push
    bracketed by pause (abort) ... continue (colocated: resume weights -> push -> resume KV
    cache, rollout/colocate.py), followed by the post-sync check with
    ``rollout.verify_sync`` (always available on demand: after a resume).  With a low-precision
    rollout the servers loaded unquantized weights: version 0 is pushed quantized right away."""
    r = cfg.rollout
    base = build_transport(r.weight_transport, actor, setup.servers, run_dir / "weights",
                           precision=r.precision, bucket_mb=r.weight_bucket_mb)
    paused = PausedTransport(base, setup.servers)
    if colocation is not None:
        paused = ColocatedTransport(paused, colocation)
    sync = VerifiedTransport(paused, setup.servers, probe_ids,
                             actor_reference(actor),
                             atol=r.verify_sync_atol or DEFAULT_ATOL[r.precision],
                             every_push=r.verify_sync)
    if r.precision != "bf16":
        sync.push(version=0)
    return sync


def resync_strategy(cfg: RunConfig, actor: MegatronActor, run_dir: Path, sync: VerifiedTransport):
    """How a restarted server gets the current weights: through a one-server transport (one
    trainer process), from the newest disk export (several ranks: a push is collective), or
    not at all (a clear error)."""
    r = cfg.rollout
    if world_size() == 1:
        return one_server_resync(lambda ss: build_transport(
            r.weight_transport, actor, ss, run_dir / "weights-resync", precision=r.precision,
            bucket_mb=r.weight_bucket_mb))
    if r.weight_transport == "disk":
        return export_dir_resync(lambda: sync.latest)
    return collective_only_resync(r.weight_transport, world_size())
