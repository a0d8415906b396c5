"""Preemption: finish the current step, checkpoint, exit with :data:`EXIT_PREEMPTED` (75).

A stop is requested by

* the **stop file** named by the environment variable ``DRPO_STOP_FILE`` appearing (the sbatch
  scripts in ``slurm/`` export it as ``<job log dir>/STOP`` and touch it when the batch shell
  gets SIGUSR1 -- ``#SBATCH --signal=B:USR1@...`` before the time limit, or
  ``scancel --signal=USR1 --batch JOB`` -- or SIGTERM), or
* the trainer process itself receiving **SIGTERM or SIGUSR1** (a second SIGTERM kills at once).

The training loop asks :meth:`Stopper.requested` once per step, after the step's metrics are
logged; all ranks agree (MAX all-reduce), so every rank stops after the same step.  The loop then
saves the checkpoint (``trainer.save``) and calls :meth:`Stopper.exit_after_checkpoint`, which
logs ``preempted: ...``, writes ``<DRPO_STOP_FILE>.checkpointed`` (the step; torchrun turns a
worker's exit code into 1, so the batch script also reads this file) and raises
``SystemExit(75)``.  The batch script then runs ``scontrol requeue``; the requeued job (same job
id, same ``output_dir``) resumes from ``<output_dir>/checkpoint`` (``train.resume: auto``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" -- the job is requeued and resumes


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; ``drpo train`` exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class StoppedDuringStartup(SystemExit):
    """SIGTERM / SIGUSR1 arrived while the run was starting (servers loading, the model
    building): there is nothing to checkpoint yet, so the start-up is abandoned at once (what it
    started is stopped by ``run.build_run``) and ``drpo train`` exits with
    :data:`EXIT_PREEMPTED`; a requeued job starts (or resumes) again."""

    def __init__(self, reason: str):
        super().__init__(EXIT_PREEMPTED)
        self.reason = reason


class Stopper:
    """Watches the stop file and SIGTERM/SIGUSR1 (handlers installed from the main thread only).

    Inside :meth:`during_startup` a signal stops at once (:class:`StoppedDuringStartup`); in the
    loop it is a request that :meth:`requested` reports after the step."""

    def __init__(self, stop_file: str | None = None, install_signals: bool = True):
        self.stop_file = Path(stop_file) if stop_file else None
        self.reason: str | None = None
        self._previous: dict = {}
        self._startup = False
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def close(self) -> None:
        """Restore the signal handlers that were there before (the loop ended)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @classmethod
    def from_env(cls) -> Stopper:
        return cls(os.environ.get("DRPO_STOP_FILE") or None)

    @contextlib.contextmanager
    def during_startup(self) -> Iterator[None]:
        """A signal inside this block raises :class:`StoppedDuringStartup` (also for one that
        arrived just before it)."""
        if self.reason is not None:
            raise StoppedDuringStartup(self.reason)
        self._startup = True
        try:
            yield
        finally:
            self._startup = False

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._startup:
            self.reason = name
            self._startup = False  # raised once; the clean-up below runs undisturbed
            log.warning("got %s during start-up: stopping what was started and exiting %d",
                        name, EXIT_PREEMPTED)
            raise StoppedDuringStartup(name)
        if self.reason is None:
            self.reason = name
            log.warning("got %s: finishing the current step, then checkpoint and exit %d",
                        name, EXIT_PREEMPTED)
        if signum == signal.SIGTERM:  # a second SIGTERM terminates at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _local(self) -> bool:
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason is not None

    def requested(self) -> bool:
        """True when this rank or any other rank saw a stop request (collective when
        torch.distributed is initialized with more than one rank: call it on every rank)."""
        local = self._local()
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a dependency
            return local
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1 if local else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() and self.reason is None:
            self.reason = "another rank"
        return bool(t.item())

    def exit_after_checkpoint(self, step: int) -> None:
        """Call after ``save(c, step)``: logs, writes the marker next to the stop file (rank 0)
        and raises :class:`Preempted` (exit code 75)."""
        log.warning("preempted (%s): saved the checkpoint of step %d; exiting with %d so the job "
                    "is requeued and resumes at step %d", self.reason, step, EXIT_PREEMPTED, step + 1)
        if self.stop_file is not None and int(os.environ.get("RANK", "0")) == 0:
            self.stop_file.with_name(self.stop_file.name + ".checkpointed").write_text(
                f"{step} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        raise Preempted(step)
