"""What wraps a weight transport in a run: pause/continue around pushes, the post-sync check,
and how a restarted rollout server is re-synced.

* :class:`PausedTransport` brackets every push with ``/pause_generation`` (mode ``abort``) and
  ``/continue_generation`` on each server: a request in flight during an update comes back
  aborted and is re-issued whole (rollout/fleet.py), so no sample mixes two weight versions.
* :class:`VerifiedTransport` runs the post-sync check (rollout/verify.py: probe log-probs of
  every server against the trainer's own forward) after every push, or on demand.
* ``one_server_resync`` / ``export_dir_resync`` / ``collective_only_resync``: the ``resync``
  strategy the rollout front calls for a restarted server (``RolloutSetup.front``).

Collective over the training ranks like the transports themselves; the servers are only known
on the driver rank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from drpo_megatron.dist import is_driver
from drpo_megatron.rollout.server import SGLangServer, ServerError
from drpo_megatron.rollout.verify import verify_sync
from drpo_megatron.samples import Sample

log = logging.getLogger(__name__)


class PausedTransport:
    """Wraps a weight transport: every push is bracketed by ``/pause_generation`` (mode
    ``abort``) and ``/continue_generation`` on each server (driver rank only; the push itself
    stays collective).  ``version`` is the last version pushed (the re-sync target)."""

    def __init__(self, inner, servers: Sequence[SGLangServer], *, mode: str = "abort",
                 version: int = 0):
        self.inner = inner
        self.servers = list(servers)
        self.mode = mode
        self.version = version

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, version: int) -> dict[str, float]:
        paused: list[SGLangServer] = []
        t0 = time.time()
        try:
            if is_driver():
                for s in self.servers:
                    s.pause_generation(self.mode)
                    paused.append(s)
            t_pause = time.time() - t0
            out = dict(self.inner.push(version))
            self.version = version
        finally:
            for s in paused:
                try:
                    s.continue_generation()
                except ServerError as e:  # a dead server: the watchdog restarts it
                    log.warning("%s", str(e).splitlines()[0])
        out["perf/weight_sync_pause_s"] = t_pause
        return out

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def actor_reference(actor) -> Callable[[Sample], torch.Tensor]:
    """The trainer's log-probs of a probe sample at temperature 1 (the greedy probe's scale)."""

    def ref(sample: Sample) -> torch.Tensor:
        return actor.compute_logprobs([sample], temperature=1.0)[0]

    return ref


class VerifiedTransport:
    """Wraps a transport: with ``every_push`` each ``push`` is followed by :func:`verify_sync`;
    :meth:`verify` checks on demand (the trainer does after a resume).  Collective over the
    training ranks; ``servers`` is empty on all but the driver rank."""

    def __init__(self, inner, servers: Sequence[SGLangServer], probe_ids: list[int],
                 reference_logprobs: Callable[[Sample], torch.Tensor], atol: float,
                 every_push: bool = True):
        self.inner = inner
        self.servers = servers
        self.probe_ids = list(probe_ids)
        self.reference_logprobs = reference_logprobs
        self.atol = atol
        self.every_push = every_push

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, version: int) -> dict[str, float]:
        out = dict(self.inner.push(version))
        if self.every_push:
            out.update(self.verify(version))
        return out

    def verify(self, version: int) -> dict[str, float]:
        t0 = time.time()
        out = verify_sync(self.servers, version, self.probe_ids, self.reference_logprobs,
                          atol=self.atol)
        out["perf/weight_sync_verify_time_s"] = time.time() - t0
        return out


def one_server_resync(build_transport: Callable[[list[SGLangServer]], Any]
                      ) -> Callable[[SGLangServer, int], None]:
    """A ``resync(server, version)`` that pushes ``version`` through a one-server transport made
    by ``build_transport([server])`` (closed afterwards); raises unless the server then reports
    ``weight_version == version``."""

    def resync(s: SGLangServer, version: int) -> None:
        t = build_transport([s])
        try:
            t.push(version=version)
        finally:
            close = getattr(t, "close", None)
            if close is not None:
                close()
    return resync


def export_dir_resync(latest: Callable[[], Path | None]) -> Callable[[SGLangServer, int], None]:
    """A ``resync(server, version)`` that needs no collective: the restarted server loads the
    newest HF export of the disk transport (``latest()``), or, before the first push, keeps the
    initial checkpoint it started from (version 0).  What a trainer with several ranks uses: a
    push through a transport is collective (every rank exports its shards), and a server dies
    on the driver rank alone, in the middle of a rollout."""

    def resync(s: SGLangServer, version: int) -> None:
        path = latest()
        if path is None:
            if version != 0:
                raise ServerError(f"{s.name}: no weight export to re-sync version {version} from")
            s.set_weight_version("0")
        else:
            s.update_weights_from_disk(path, weight_version=str(version))
    return resync


def collective_only_resync(transport: str, ranks: int) -> Callable[[SGLangServer, int], None]:
    """The ``resync`` of a multi-rank trainer whose transport is collective (tensor,
    distributed): a dead server cannot be re-synced in the middle of a rollout, so the step
    fails with what to change instead of hanging in a collective the other ranks never join."""

    def resync(s: SGLangServer, version: int) -> None:
        raise ServerError(
            f"{s.name} was restarted but cannot be re-synced to weight version {version}: with "
            f"{ranks} training ranks the {transport!r} transport is collective and the other ranks "
            f"are not in it mid-rollout; set rollout.weight_transport: disk (re-syncs from the "
            f"newest export) or resume the run from its checkpoint")
    return resync
