"""Weight transports: how the trainer's current weights reach the rollout servers.

``WEIGHT_TRANSPORTS`` maps a name to a class built from ``(actor, servers, work_dir)`` with one
method ``push(version: int) -> dict[str, float]`` returning ``perf/`` metrics.  After a push every
server reports ``weight_version == str(version)``; a server that does not raises.

* ``disk``: HF safetensors written by the trainer, ``/update_weights_from_disk``.
* ``tensor``: same host.  HF-named tensors in buckets of ``bucket_mb``, pickled with torch's
  ``ForkingPickler`` (CPU tensors travel as shared-memory file names: sharing strategy
  ``file_system``; CUDA tensors as CUDA IPC handles), ``/update_weights_from_tensor``.
* ``distributed``: a process group trainer(rank 0) + every server TP rank, joined through
  ``/init_weights_update_group``; per bucket the servers get names/dtypes/shapes over HTTP
  (``/update_weights_from_distributed``) while the trainer broadcasts the tensors (gloo on CPU,
  NCCL on GPU).

The in-place transports are bracketed by ``/begin_weight_update`` ... ``/end_weight_update``
(required by SGLang 0.5.23), the prefix cache is flushed afterwards and the version is set last,
so a server never reports the new version with a partially loaded model.  The rollout precision
(``bf16`` / ``fp8_emulated`` / ``fp8``) is applied by the actor's ``named_hf_tensors`` for every
transport.  Under model parallelism the tensor stream is collective: every trainer rank iterates
it, rank 0 sends.
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, get_args, Iterable, Iterator, Literal, Protocol, Sequence

import torch

from drpo_megatron.dist import barrier, free_port, is_driver
from drpo_megatron.models.megatron_model import loopback_store
from drpo_megatron.rollout.server import SGLangServer, ServerError

log = logging.getLogger(__name__)

DEFAULT_BUCKET_MB = 512.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # a distributed-transport master address on this host


class WeightTransport(Protocol):
    def push(self, version: int) -> dict[str, float]: ...


def _check_versions(servers: Sequence[SGLangServer], version: int) -> None:
    for s in servers:
        got = s.weight_version()
        if got != str(version):
            raise ServerError(f"{s.name}: weight_version is {got!r} after pushing version "
                              f"{version}; the update did not take effect (log: {s.log_path})")


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a named-tensor stream into lists of at most ``bucket_bytes`` (a tensor larger than
    one bucket travels alone).  Order is preserved."""
    if bucket_bytes <= 0:
        raise ValueError(f"rollout.weight_bucket_mb must be > 0 (got {bucket_bytes} bytes)")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def wire_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor as sent: floating tensors cast to the server's dtype (the server would cast on
    load anyway; FP8 tensors and their fp32 scales are sent as they are), always a fresh
    contiguous copy (sharing moves a CPU tensor's storage into shared memory: never do that to a
    live parameter)."""
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.element_size() > 1 and t.dtype != dtype:
        return t.to(dtype).contiguous()
    return t.clone(memory_format=torch.contiguous_format)


def _wire_named(bucket, dtype):
    """FP8 weights and their fp32 ``weight_scale_inv`` keep their dtypes; the rest is cast."""
    out = []
    for name, t in bucket:
        keep = name.endswith("weight_scale_inv") or t.dtype == torch.float8_e4m3fn
        out.append((name, wire_tensor(t, None if keep else dtype)))
    return out


_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                 "float32": torch.float32, "float": torch.float32, "auto": None}


class _BaseTransport:
    def __init__(self, actor, servers: Sequence[SGLangServer], work_dir: str | Path,
                 precision: str = "bf16", bucket_mb: float = DEFAULT_BUCKET_MB,
                 named_tensors: Callable[[str], Iterable[tuple[str, torch.Tensor]]] | None = None,
                 wire_dtype: str | None = None):
        self.actor = actor
        self.servers = list(servers)
        self.work_dir = Path(work_dir)
        self.precision = precision
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)
        self._named = named_tensors
        dt = wire_dtype or (self.servers[0].cfg.dtype if self.servers else "bfloat16")
        if dt not in _TORCH_DTYPES:
            raise ValueError(f"server dtype {dt!r}: choose one of {sorted(_TORCH_DTYPES)}")
        self.wire_dtype = _TORCH_DTYPES[dt]

    def named(self) -> Iterable[tuple[str, torch.Tensor]]:
        if self._named is not None:
            return self._named(self.precision)
        return self.actor.named_hf_tensors(self.precision)

    def _finish(self, version: int) -> None:
        """Close the update session, flush stale KV, then publish the version."""
        for s in self.servers:
            s.end_weight_update()
            s.flush_cache()
            s.set_weight_version(str(version))
        _check_versions(self.servers, version)


class DiskTransport:
    """HF safetensors written by the trainer, loaded by ``/update_weights_from_disk``.

    Keeps only the newest export (the previous one is removed after every server switched).
    """

    def __init__(self, actor, servers: Sequence[SGLangServer], work_dir: str | Path,
                 precision: str = "bf16", **_: Any):
        self.actor = actor
        self.servers = list(servers)
        self.work_dir = Path(work_dir)
        self.precision = precision
        self._previous: Path | None = None

    @property
    def latest(self) -> Path | None:
        """The newest export every server switched to (None before the first push)."""
        return self._previous

    def push(self, version: int) -> dict[str, float]:
        t0 = time.time()
        target = self.work_dir / f"v{version:06d}"
        self.actor.export_hf(target, precision=self.precision)
        t_export = time.time() - t0
        if is_driver():
            for s in self.servers:
                s.update_weights_from_disk(target, weight_version=str(version))
            _check_versions(self.servers, version)
            if self._previous is not None and self._previous != target:
                shutil.rmtree(self._previous, ignore_errors=True)
            self._previous = target
        barrier()
        return {"perf/weight_sync_time_s": time.time() - t0, "perf/weight_export_time_s": t_export}


def serialize_named_tensors(bucket: list[tuple[str, torch.Tensor]]) -> str:
    """``ForkingPickler`` dump of ``[(name, tensor), ...]`` as base64 (SGLang's
    ``MultiprocessingSerializer`` format).  CPU tensors need sharing strategy ``file_system``:
    with ``file_descriptor`` the fds would have to be passed over a unix socket and the server
    dies trying to receive them."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's tensor/storage reductions

    buf = io.BytesIO()
    ForkingPickler(buf).dump(bucket)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorTransport(_BaseTransport):
    """Same-host transport through ``/update_weights_from_tensor`` (see the module doc)."""

    def push(self, version: int) -> dict[str, float]:
        import torch.multiprocessing as mp

        if mp.get_sharing_strategy() != "file_system":
            mp.set_sharing_strategy("file_system")
        t0 = time.time()
        rank0 = is_driver()
        nbytes = 0
        nbuckets = 0
        if rank0:
            tp = {s.name: s.tp_size() for s in self.servers}
            for s in self.servers:
                s.begin_weight_update()
        for bucket in iter_buckets(self.named(), self.bucket_bytes):
            if not rank0:
                continue  # the stream is collective: iterate it on every rank
            wire = _wire_named(bucket, self.wire_dtype)
            payload = serialize_named_tensors(wire)
            for s in self.servers:
                s.update_weights_from_tensor([payload] * tp[s.name])
            nbytes += sum(t.numel() * t.element_size() for _, t in wire)
            nbuckets += 1
            del wire, payload  # frees the shared-memory segments of this bucket
        if rank0:
            self._finish(version)
        barrier()
        dt = time.time() - t0
        return {"perf/weight_sync_time_s": dt, "perf/weight_sync_bytes": float(nbytes),
                "perf/weight_sync_buckets": float(nbuckets)}


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout_s: float = 600.0, store=None):
    """A process group outside the default one (the trainer's own world is unrelated to the
    update group): the same construction as SGLang's ``init_custom_process_group``, which the
    server side uses, so both sides rendezvous on one prefixed TCP store.  ``store``: the master
    store made beforehand (rank 0 on loopback: it then listens on 127.0.0.1 only), else the
    rendezvous of ``init_method`` makes it."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                    _world, rendezvous)

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                      group_name=group_name, backend_options=None,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list]:
    errors: list = [None] * len(calls)

    def wrap(i, fn):
        try:
            fn()
        except BaseException as e:  # re-raised by _join
            errors[i] = e

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, errors


def _join(threads, errors, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    for t in threads:
        t.join(max(deadline - time.time(), 0.0))
        if t.is_alive():
            raise ServerError(f"{what}: a server call is still running after {timeout_s:.0f}s")
    for e in errors:
        if e is not None:
            raise e


class DistributedTransport(_BaseTransport):
    """Broadcast transport through a trainer+servers process group (see the module doc)."""

    _groups_made = 0  # each (re)connect gets a fresh group name (names are process-global)

    def __init__(self, *args, backend: str | None = None, master_address: str = "127.0.0.1",
                 **kw):
        super().__init__(*args, **kw)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.group = None
        self.group_name = ""
        self._group_servers: list = []

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def _members(self) -> list:
        return [(s.name, s.proc.pid if s.proc is not None else None) for s in self.servers]

    def connect(self) -> None:
        """(Re)build the update group over the current servers (rank 0 = trainer)."""
        if self.group is not None:
            self.close()
        DistributedTransport._groups_made += 1
        self.group_name = f"drpo_weight_update_{DistributedTransport._groups_made}"
        tps = [s.tp_size() for s in self.servers]
        world = 1 + sum(tps)
        timeout = max(s.cfg.weight_update_timeout_s for s in self.servers)
        store = None
        if self.master_address in LOOPBACK_HOSTS:  # the group's store on 127.0.0.1 only
            store, port = loopback_store(datetime.timedelta(seconds=timeout), world_size=world)
        else:  # the servers are on other hosts: the store must be reachable from them
            port = free_port(self.master_address)
        calls, offset = [], 1
        for s, tp in zip(self.servers, tps):
            calls.append(lambda s=s, off=offset: s.init_weights_update_group(
                master_address=self.master_address, master_port=port, rank_offset=off,
                world_size=world, group_name=self.group_name, backend=self.backend,
                timeout_s=timeout))
            offset += tp
        threads, errors = _in_threads(calls)
        t0 = time.time()
        self.group = init_custom_process_group(
            backend=self.backend, init_method=f"tcp://{self.master_address}:{port}",
            world_size=world, rank=0, group_name=self.group_name, timeout_s=timeout, store=store)
        _join(threads, errors, timeout, "init_weights_update_group")
        self._group_servers = self._members()
        log.info("weight update group %s: trainer + %d server ranks (%s), %.1fs", self.group_name,
                 world - 1, self.backend, time.time() - t0)

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is None:
            return
        for s in self.servers:
            try:
                s.destroy_weights_update_group(self.group_name)
            except ServerError as e:  # e.g. a restarted server that never joined this group
                log.warning("%s", str(e).splitlines()[0])
        try:
            dist.destroy_process_group(self.group)
        except Exception as e:  # noqa: BLE001 - teardown
            log.warning("destroying the weight update group: %s", e)
        self.group = None

    def push(self, version: int) -> dict[str, float]:
        import torch.distributed as dist

        t0 = time.time()
        rank0 = is_driver()
        if rank0 and (self.group is None or self._group_servers != self._members()):
            self.connect()  # first push, or a server was restarted / replaced
        t_connect = time.time() - t0
        nbytes = nbuckets = 0
        if rank0:
            for s in self.servers:
                s.begin_weight_update()
        dev = self._device()
        timeout = max((s.cfg.weight_update_timeout_s for s in self.servers), default=300.0)
        for bucket in iter_buckets(self.named(), self.bucket_bytes):
            if not rank0:
                continue
            wire = _wire_named(bucket, self.wire_dtype)
            names = [n for n, _ in wire]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in wire]
            shapes = [list(t.shape) for _, t in wire]
            threads, errors = _in_threads([
                lambda s=s, names=names, dtypes=dtypes, shapes=shapes: s.update_weights_from_distributed(
                    names, dtypes, shapes, group_name=self.group_name)
                for s in self.servers])
            for _, t in wire:
                dist.broadcast(t.to(dev), src=0, group=self.group)
            _join(threads, errors, timeout, "update_weights_from_distributed")
            nbytes += sum(t.numel() * t.element_size() for _, t in wire)
            nbuckets += 1
        if rank0:
            self._finish(version)
        barrier()
        dt = time.time() - t0
        return {"perf/weight_sync_time_s": dt, "perf/weight_sync_bytes": float(nbytes),
                "perf/weight_sync_buckets": float(nbuckets),
                "perf/weight_sync_connect_time_s": t_connect}


#: rollout.weight_transport: how weights reach the rollout servers
WeightTransportName = Literal["disk", "tensor", "distributed"]
WEIGHT_TRANSPORTS = {"disk": DiskTransport, "tensor": TensorTransport,
                     "distributed": DistributedTransport}
assert set(WEIGHT_TRANSPORTS) == set(get_args(WeightTransportName))


def build_transport(name: str, actor, servers, work_dir, precision: str = "bf16",
                    bucket_mb: float = DEFAULT_BUCKET_MB, **kw) -> WeightTransport:
    if name not in WEIGHT_TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={name!r} is unknown; choose one of "
                         f"{sorted(WEIGHT_TRANSPORTS)}")
    if name == "disk":
        return DiskTransport(actor, servers, work_dir, precision=precision)
    return WEIGHT_TRANSPORTS[name](actor, servers, work_dir, precision=precision,
                                   bucket_mb=bucket_mb, **kw)
