"""Weight transports: how the trainer's current weights reach the rollout servers.

``WEIGHT_TRANSPORTS`` maps a name to a class built from ``(actor, servers, work_dir)`` with one
method ``push(version: int) -> dict[str, float]`` returning ``perf/`` metrics.  After a push every
server reports ``weight_version == str(version)``; a server that does not raises.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Protocol, Sequence

from drpo_megatron.rollout.server import SGLangServer, ServerError

log = logging.getLogger(__name__)


class WeightTransport(Protocol):
    def push(self, version: int) -> dict[str, float]: ...


class DiskTransport:
    """HF safetensors written by the trainer, loaded by ``/update_weights_from_disk``.

    Keeps only the newest export (the previous one is removed after every server switched).
    """

    def __init__(self, actor, servers: Sequence[SGLangServer], work_dir: str | Path,
                 precision: str = "bf16"):
        self.actor = actor
        self.servers = list(servers)
        self.work_dir = Path(work_dir)
        self.precision = precision
        self._previous: Path | None = None

    def push(self, version: int) -> dict[str, float]:
        t0 = time.time()
        target = self.work_dir / f"v{version:06d}"
        self.actor.export_hf(target, precision=self.precision)
        t_export = time.time() - t0
        for s in self.servers:
            s.update_weights_from_disk(target, weight_version=str(version))
            got = s.weight_version()
            if got != str(version):
                raise ServerError(f"{s.name}: weight_version is {got!r} after pushing version "
                                  f"{version}; the update did not take effect (log: {s.log_path})")
        if self._previous is not None and self._previous != target:
            shutil.rmtree(self._previous, ignore_errors=True)
        self._previous = target
        return {"perf/weight_sync_time_s": time.time() - t0, "perf/weight_export_time_s": t_export}


WEIGHT_TRANSPORTS = {"disk": DiskTransport}


def build_transport(name: str, actor, servers, work_dir, precision: str = "bf16") -> WeightTransport:
    if name not in WEIGHT_TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={name!r} is unknown; choose one of "
                         f"{sorted(WEIGHT_TRANSPORTS)}")
    return WEIGHT_TRANSPORTS[name](actor, servers, work_dir, precision=precision)
