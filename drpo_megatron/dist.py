"""Who does what when the trainer runs as several processes (torchrun / srun).

Every training rank builds its shard of the Megatron model and takes part in every collective
(forward/backward, optimizer, weight export, checkpoints).  One rank, the *driver* (global rank
0), also talks to the rollout servers, computes rewards, writes metrics and shows progress; what
it produced is then shared with the other ranks by :func:`share` (a pickled broadcast over the
default process group: samples are small host-side lists, not tensors on a device).

Single process (no process group): the driver is the only rank, :func:`share` is the identity
and :func:`barrier` does nothing.  The Megatron model-parallel groups (TP/PP/EP/DP) are
``megatron.core.parallel_state``'s, set up by ``models.megatron_model.init_distributed``.
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar

import torch.distributed as dist

DRIVER_RANK = 0  # the rank that drives SGLang, logs and writes run files

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; a race with another process
    binding it before us is possible but has not been seen on one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_driver() -> bool:
    return not dist.is_initialized() or dist.get_rank() == DRIVER_RANK


def barrier() -> None:
    """``dist.barrier()`` when there is a process group."""
    if dist.is_initialized():
        dist.barrier()


def share(obj: T, src: int = DRIVER_RANK, group: Any = None) -> T:
    """``obj`` of rank ``src`` on every rank of ``group`` (default: all ranks); collective.
    Ranks other than ``src`` pass anything (their value is ignored)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def raise_everywhere(error: BaseException | None) -> None:
    """Collective: if the driver hit ``error``, every rank raises it (a driver-only exception
    would leave the other ranks blocked in their next collective until the timeout)."""
    shared = share(error)
    if shared is not None:
        if error is not None:
            raise error
        raise RuntimeError(f"the driver rank failed: {shared}") from shared
