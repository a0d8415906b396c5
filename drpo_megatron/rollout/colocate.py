"""Colocated rollout: SGLang servers on the trainer's GPUs, their memory released while it trains.

On (``rollout.colocate: true``, or env ``DRPO_ROLLOUT_MODE=colocated``, which
``slurm/colocated.sbatch.tmpl`` exports), the driver rank runs ``rollout.num_servers`` servers of
``parallel.rollout_tp`` GPUs each on its node: server ``i`` gets ``--tp-size rollout_tp
--base-gpu-id i*rollout_tp --mem-fraction-static F --enable-memory-saver`` (SGLang's
torch_memory_saver: weights, KV cache and CUDA graphs live in pausable CUDA virtual-memory
regions).  One step, in the order that never holds the servers' KV cache and the trainer's
activations at the same time:

1. rollout: the servers hold weights + KV cache; the trainer holds only its resident state
   (weights, gradient buffers, optimizer states);
2. :meth:`Colocation.release` (driver, before the samples go to the other ranks, so no rank
   starts training first): ``POST /release_memory_occupation`` (all tags: weights, KV cache, CUDA
   graphs) on every server;
3. training (forward, backward, optimizer) has the GPU to itself;
4. the push (:class:`ColocatedTransport`): every rank empties torch's CUDA cache (the
   activations' blocks go back to the driver) and meets at a barrier, then ``POST
   /resume_memory_occupation {"tags": ["weights"]}`` (the weight memory is mapped again, its
   contents undefined), the new weights are pushed (``rollout.weight_transport: tensor``: CUDA IPC
   handles on the same host), then ``{"tags": ["kv_cache", "cuda_graph"]}``;
5. eval and the next rollout run on the resumed servers.

``F`` (``--mem-fraction-static``, SGLang's "(weights + KV pool) / GPU memory") comes from
``drpo plan``'s estimate: ``(gpu_memory_gb - trainer resident - SERVER_RESERVE_GIB) /
gpu_memory_gb`` (:func:`colocated_memory`); the servers must start before the trainer allocates
anything (SGLang sizes the KV pool from the memory free when it loads), so ``run.py`` waits for
them before it builds the actor.

On CPU (tests): no memory saver exists (torch_memory_saver is CUDA only) and SGLang's no-op
adapter makes release / resume keep the memory, but the endpoints, the request sequence, the
weight versions and the order around the push are the same and run against a real server
(``tests/rollout/test_colocate.py``).  What only a GPU shows -- the memory really returned and
remapped -- is measured by ``tools/gpu_check.py`` (``colocate`` section).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from drpo_megatron.errors import InputError

log = logging.getLogger(__name__)

MODE_ENV = "DRPO_ROLLOUT_MODE"  # "colocated" (slurm/colocated.sbatch.tmpl) | unset
# SGLang's memory types (sglang/srt/constants.py): release takes them all, resume in two steps
WEIGHTS = "weights"
KV_CACHE = "kv_cache"
CUDA_GRAPH = "cuda_graph"
RESUME_AFTER_PUSH = (KV_CACHE, CUDA_GRAPH)
# What a colocated server keeps outside its static pool (activations, CUDA-graph buffers, its own
# CUDA context): SGLang's own minimum reserve on large GPUs is 10 GiB
# (sglang/srt/arg_groups/memory_hook.py: reserved_mem = max(reserved_mem, 10 * 1024) MiB).
SERVER_RESERVE_GIB = 10.0
GIB = 2 ** 30


class ColocationError(InputError):
    """A colocated layout that cannot work; names the field, the value and the fix."""


# ----------------------------------------------------------------------------- configuration


def requested(cfg) -> tuple[bool, str]:
    """(colocated?, where that came from): ``rollout.colocate`` or env ``DRPO_ROLLOUT_MODE``."""
    if getattr(cfg.rollout, "colocate", False):
        return True, "rollout.colocate"
    mode = os.environ.get(MODE_ENV, "")
    if mode == "colocated":
        return True, f"{MODE_ENV}=colocated"
    if mode and mode != "disaggregated":
        raise ColocationError(f"{MODE_ENV}={mode!r}: choose 'colocated' or 'disaggregated' (or "
                              "unset it)")
    return False, ""


def check_config(cfg, source: str | None = None) -> None:
    """What a colocated run needs from the config (before anything starts).  ``source``: why the
    layout is colocated when the caller decides (``drpo plan``: ``parallel.rollout_nodes=0``);
    None: :func:`requested` decides (config field or env)."""
    if source is None:
        on, source = requested(cfg)
        if not on:
            return
    par, r = cfg.parallel, cfg.rollout
    if par.rollout_nodes:
        raise ColocationError(f"{source} with parallel.rollout_nodes={par.rollout_nodes}: colocated "
                              "servers run on the trainer's GPUs; set parallel.rollout_nodes: 0 or "
                              "turn colocation off")
    if getattr(r, "router_url", None) or os.environ.get("DRPO_ROUTER_URL"):
        raise ColocationError(f"{source} with an external router (rollout.router_url / "
                              "DRPO_ROUTER_URL): colocated servers are launched by drpo; unset it")
    if r.num_servers * par.rollout_tp > par.gpus_per_node:
        raise ColocationError(
            f"rollout.num_servers={r.num_servers} x parallel.rollout_tp={par.rollout_tp} GPUs "
            f"exceeds parallel.gpus_per_node={par.gpus_per_node}: colocated servers share the "
            f"driver's node; use at most {par.gpus_per_node // par.rollout_tp} servers")
    if r.weight_transport == "distributed":
        raise ColocationError(
            f"rollout.weight_transport='distributed' with {source}: NCCL cannot put the trainer "
            "and a server on the same GPU in one group; use 'tensor' (same host, CUDA IPC)")


def server_args(index: int, *, rollout_tp: int, mem_fraction: float | None,
                cuda: bool) -> list[str]:
    """The per-server flags of a colocated server ``index`` (GPUs ``index*rollout_tp ...``).
    Without CUDA none: one CPU "device", no memory saver (the CPU server flags stay)."""
    if not cuda:
        return []
    args = ["--enable-memory-saver", "--tp-size", str(rollout_tp),
            "--base-gpu-id", str(index * rollout_tp)]
    if mem_fraction is not None:
        args += ["--mem-fraction-static", f"{mem_fraction:.3f}"]
    return args


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def configure_servers(servers: Sequence[Any], *, rollout_tp: int, mem_fraction: float | None,
                      cuda: bool) -> None:
    """Give each (not yet started) server its colocated flags; flags the user already put in
    ``rollout.server.extra_args`` win.  A restarted server (fleet watchdog) gets the same."""
    for i, s in enumerate(servers):
        extra = list(s.cfg.extra_args)
        mine = server_args(i, rollout_tp=rollout_tp, mem_fraction=mem_fraction, cuda=cuda)
        add: list[str] = []
        j = 0
        while j < len(mine):
            flag = mine[j]
            has_value = j + 1 < len(mine) and not mine[j + 1].startswith("--")
            if not _has_flag(extra, flag):
                add += mine[j:j + 2] if has_value else [flag]
            j += 2 if has_value else 1
        s.cfg = s.cfg.model_copy(update={"extra_args": extra + add})


@dataclass
class ColocatedMemory:
    """Per-GPU memory of the colocated layout (GiB), from ``drpo plan``'s estimate."""

    budget_gib: float
    trainer_resident_gib: float   # weights + gradient buffers + optimizer states + overhead
    trainer_peak_gib: float       # the plan's total (servers released)
    server_weights_gib: float     # one server's weights per GPU (/ rollout_tp)
    server_reserve_gib: float
    kv_cache_gib: float
    kv_tokens: int                # KV capacity of one server (tokens)
    max_seq_tokens: int
    mem_fraction_static: float

    def line(self) -> str:
        return (f"colocated rollout per GPU: trainer resident {self.trainer_resident_gib:.2f} + "
                f"server weights {self.server_weights_gib:.2f} + KV cache {self.kv_cache_gib:.2f} "
                f"({self.kv_tokens:,} tokens = {self.kv_tokens // max(self.max_seq_tokens, 1)} "
                f"sequences of {self.max_seq_tokens}) + server reserve {self.server_reserve_gib:.2f} "
                f"= {self.budget_gib:.2f} GiB -> SGLang --mem-fraction-static "
                f"{self.mem_fraction_static:.3f}; training: servers released (weights, KV cache, "
                f"CUDA graphs), trainer peak {self.trainer_peak_gib:.2f} GiB")


def kv_bytes_per_token(arch, rollout_tp: int, dtype_bytes: int = 2) -> float:
    """K and V of every full-attention layer, per token, on one GPU of a server."""
    layers = arch.num_hidden_layers if arch.full_attention_interval <= 1 else \
        arch.num_hidden_layers // arch.full_attention_interval
    kv_heads = max(1, arch.num_key_value_heads // rollout_tp)  # replicated when fewer than TP
    return 2 * layers * kv_heads * arch.head_dim * dtype_bytes


def colocated_memory(plan, arch, cfg) -> ColocatedMemory:
    """The colocated memory split of ``plan`` (a :class:`drpo_megatron.operate.plan.Plan`);
    raises :class:`ColocationError` when the servers' weights and one longest sequence of KV
    cache do not fit next to the trainer's resident state."""
    par, r = cfg.parallel, cfg.rollout
    budget = plan.budget_gib
    resident = plan.weights_gib + plan.grads_gib + plan.optimizer_gib + plan.overhead_gib
    wbytes = 1 if r.precision == "fp8" else 2
    weights = plan.params_total * wbytes / par.rollout_tp / GIB
    static = budget - resident - SERVER_RESERVE_GIB
    kv = static - weights
    per_tok = kv_bytes_per_token(arch, par.rollout_tp)
    seq = (cfg.task.max_prompt_tokens or 0) + r.max_new_tokens
    tokens = int(kv * GIB // per_tok) if kv > 0 else 0
    mem = ColocatedMemory(budget_gib=budget, trainer_resident_gib=resident,
                          trainer_peak_gib=plan.total_gib, server_weights_gib=weights,
                          server_reserve_gib=SERVER_RESERVE_GIB, kv_cache_gib=max(kv, 0.0),
                          kv_tokens=tokens, max_seq_tokens=seq,
                          mem_fraction_static=max(static, 0.0) / budget)
    if tokens < seq:
        raise ColocationError(
            f"parallel.gpu_memory_gb={budget:g}: colocated, the trainer keeps {resident:.1f} GiB "
            f"per GPU between steps and a server needs {weights:.1f} GiB of weights + "
            f"{SERVER_RESERVE_GIB:g} GiB reserve, leaving KV cache for {tokens} tokens, less than "
            f"one sequence of {seq}; raise parallel.rollout_tp or tp/pp, or use rollout nodes "
            "(parallel.rollout_nodes > 0)")
    return mem


# ----------------------------------------------------------------------------------- runtime


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class Colocation:
    """The servers' side of a colocated step (driver rank; on the other ranks ``servers`` is
    empty and every call only takes part in the collective parts)."""

    def __init__(self, servers: Sequence[Any], *, source: str = "rollout.colocate"):
        self.servers = list(servers)
        self.source = source
        self.released = False
        self.events: list[tuple[str, str, tuple[str, ...] | None]] = []  # (server, action, tags)

    def _call(self, action: str, tags: Sequence[str] | None) -> None:
        for s in self.servers:
            if action == "release":
                s.release_memory_occupation(tags)
            else:
                s.resume_memory_occupation(tags)
            self.events.append((s.name, action, None if tags is None else tuple(tags)))

    def release(self) -> dict[str, float]:
        """Before training: every server gives back its weights, KV cache and CUDA graphs."""
        t0 = time.time()
        if self.servers and not self.released:
            self._call("release", None)
        self.released = True
        return {"perf/colocate_release_s": time.time() - t0}

    def resume_weights(self) -> float:
        """(collective) The trainer ranks return their cached blocks, then the servers map their
        weight memory again.  Returns seconds."""
        t0 = time.time()
        if _cuda():
            import torch

            torch.cuda.empty_cache()
        _barrier()  # no server maps memory before every trainer rank has emptied its cache
        if self.servers and self.released:
            self._call("resume", [WEIGHTS])
        return time.time() - t0

    def resume_rest(self) -> float:
        """After the push: KV cache and CUDA graphs back.  Returns seconds."""
        t0 = time.time()
        if self.servers and self.released:
            self._call("resume", list(RESUME_AFTER_PUSH))
        self.released = False
        return time.time() - t0


class ColocatedTransport:
    """Wraps a weight transport (innermost pause/continue wrapper included): a push after a
    release resumes the weights first and the KV cache after (module doc, step 4)."""

    def __init__(self, inner, colocation: Colocation):
        self.inner = inner
        self.colocation = colocation

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, version: int) -> dict[str, float]:
        was_released = self.colocation.released
        t_weights = self.colocation.resume_weights() if was_released else 0.0
        out = dict(self.inner.push(version))
        t_rest = self.colocation.resume_rest() if was_released else 0.0
        out["perf/colocate_resume_weights_s"] = t_weights
        out["perf/colocate_resume_kv_s"] = t_rest
        return out

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def setup(cfg, servers: Sequence[Any], *, driver: bool,
          mem_fraction: Callable[[Any], float | None] = lambda cfg: None) -> Colocation | None:
    """Called by ``run.build_run`` right after the servers are created (before they start): None
    when not colocated; else configures the servers' flags and returns the :class:`Colocation`
    the loop and the transport use.  ``mem_fraction(cfg)``: the servers'
    ``--mem-fraction-static`` on GPU (``drpo plan``'s split: operate/plan.py)."""
    on, source = requested(cfg)
    if not on:
        return None
    check_config(cfg)
    cuda = _cuda()
    fraction = mem_fraction(cfg) if cuda and driver else None
    configure_servers(servers, rollout_tp=cfg.parallel.rollout_tp, mem_fraction=fraction, cuda=cuda)
    if driver:
        log.info("colocated rollout (%s): %d server(s) on this node's GPUs%s", source, len(servers),
                 f", --mem-fraction-static {fraction:.3f}" if fraction is not None else
                 " (CPU: no memory saver; release/resume keep the memory)")
    return Colocation(servers if driver else [], source=source)


__all__ = ["ColocationError", "Colocation", "ColocatedTransport", "ColocatedMemory",
           "check_config", "colocated_memory", "configure_servers", "requested", "server_args",
           "setup", "MODE_ENV", "SERVER_RESERVE_GIB"]
