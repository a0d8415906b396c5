"""Reward calls in worker processes, each with a hard time limit.

A Python thread cannot be stopped, and math-verify's own timeout (``signal.alarm``) works only in
the main thread and only where the running code lets the signal handler in.  So every reward call
runs in one of ``num_workers`` worker processes (``python -m drpo_megatron.rewards.pool``: a fresh
interpreter, never a fork of the threaded trainer, and unlike multiprocessing's spawn it does not
re-import the trainer's main module; the parent's ``sys.path`` goes along as ``PYTHONPATH``, two
pipes carry pickled messages) that import the reward function once
(from its spec, as :func:`~drpo_megatron.rewards.loader.load_function` does) and then serve calls;
a call still running at its deadline is ended by SIGKILL of its worker, which is replaced by a new
one.  The deadline starts when the call is handed to a worker that has finished importing, so
import time never counts against a call.  If the function has a ``warmup()`` attribute, a new
worker calls it once before taking calls (math-verify's first parse builds its grammar).

Call modes (``mode`` of a task):

``one``    ``fn(prompt, response, meta)`` (a coroutine function is run with ``asyncio.run``)
``batch``  ``fn(prompts, responses, metas)`` (same)
``many``   a list of ``(prompt, response, meta)`` for an ``async def`` per-sample function: run
           concurrently on one event loop, each under ``asyncio.wait_for(limit)``; the result is
           a list of per-sample ``(status, value)``.

Every task's result is ``(status, value)``: ``("ok", return value)``, ``("error", "Type:
message")`` (the call raised, or the worker died) or ``("timeout", None)``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing.connection as mpc
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A new worker must have imported the reward function within this time (spawn + imports of
# sympy / the user's module on a loaded machine take seconds, not minutes).
START_TIMEOUT_S = 300.0
# How long close() waits for a worker to exit after asking it to, before SIGKILL.
STOP_GRACE_S = 2.0
# prctl option: the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


class RewardError(RuntimeError):
    """The reward could not be computed and ``reward.on_error`` does not allow a fallback."""


def _call(fn, mode: str, payload):
    if mode == "many":
        limit, items = payload

        async def one(args):
            try:
                return ("ok", await asyncio.wait_for(fn(*args), limit))
            except asyncio.TimeoutError:
                return ("timeout", None)
            except Exception as e:  # noqa: BLE001 - reported per sample
                return ("error", f"{type(e).__name__}: {e}")

        async def all_():
            return list(await asyncio.gather(*(one(a) for a in items)))

        return asyncio.run(all_())
    out = fn(*payload)
    if asyncio.iscoroutine(out):
        out = asyncio.run(out)
    return out


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the trainer dies (a worker stuck in a pathological call
    would otherwise outlive a crashed trainer; a clean exit closes the pipes and the worker's
    next read ends it).  No-op elsewhere.  The kernel ties this to the *thread* that started
    the worker: the pool must be used from a long-lived thread (the loop's main thread)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the trainer died before prctl took effect
        os._exit(1)


def _worker_main(inbox, conn, spec: str) -> None:
    """A worker: import ``spec``, say ready on ``conn``, then answer ``(task_id, mode,
    payload)`` messages from ``inbox`` until ``None`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    _die_with_parent()
    try:
        from drpo_megatron.rewards.loader import load_function

        fn = load_function(spec)
        warmup = getattr(fn, "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("load_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, mode, payload = msg
        try:
            reply = (tid, "ok", _call(fn, mode, payload))
        except BaseException as e:  # noqa: BLE001 - the call's failure is the result
            reply = (tid, "error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send((tid, "error", f"the return value could not be sent back to the trainer "
                                     f"({type(e).__name__}: {e}); return plain numbers / dicts"))


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Any  # results from the worker (readable; EOF when it dies)
    inbox: Any  # tasks to the worker
    started: float
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


class RewardWorkerPool:
    """``num_workers`` worker processes serving the reward function of ``spec``."""

    def __init__(self, spec: str, num_workers: int, *, start_timeout_s: float = START_TIMEOUT_S):
        self.spec = spec
        self.num_workers = num_workers
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self.kills = 0  # workers killed at a deadline (for tests and logs)

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> _Worker:
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(task_r), str(res_w),
                                 self.spec], pass_fds=(task_r, res_w), env=env,
                                stdin=subprocess.DEVNULL)
        os.close(task_r)
        os.close(res_w)
        return _Worker(proc, mpc.Connection(res_r, writable=False),
                       mpc.Connection(task_w, readable=False), time.monotonic())

    def start(self) -> None:
        """Start the workers (they import in the background); idempotent."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    @staticmethod
    def _stop(w: _Worker, grace_s: float = 0.0) -> None:
        if grace_s > 0:
            try:
                w.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        w.conn.close()
        w.inbox.close()

    def _replace(self, w: _Worker) -> None:
        self._stop(w)
        self._workers[self._workers.index(w)] = self._spawn()

    def close(self) -> None:
        """Ask every worker to exit, SIGKILL those still running after ``STOP_GRACE_S``."""
        for w in self._workers:
            try:
                w.inbox.send(None)
            except OSError:
                pass
        end = time.monotonic() + STOP_GRACE_S
        for w in self._workers:
            self._stop(w, grace_s=max(0.01, end - time.monotonic()))
        self._workers = []

    # ------------------------------------------------------------------ calls
    def run(self, tasks: list[tuple[str, Any, float]]) -> list[tuple[str, Any]]:
        """Run ``(mode, payload, limit_s)`` tasks on the workers; one ``(status, value)`` per
        task, in order.  Raises :class:`RewardError` when a worker cannot import the function
        or does not start within ``start_timeout_s``."""
        self.start()
        results: list[tuple[str, Any] | None] = [None] * len(tasks)
        queue = collections.deque(range(len(tasks)))
        while queue or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and queue:
                    i = queue.popleft()
                    mode, payload, limit = tasks[i]
                    w.inbox.send((i, mode, payload))
                    w.task, w.deadline = i, time.monotonic() + limit
            now = time.monotonic()
            due = [w.deadline if w.ready else w.started + self.start_timeout_s
                   for w in self._workers if w.task is not None or not w.ready]
            timeout = max(0.0, min(due) - now) if due else None
            ready = set(mpc.wait([w.conn for w in self._workers], timeout))
            for w in list(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # EOF: the worker died (segfault, OOM kill, os._exit ...)
                        self._died(w, results)
                    elif not w.ready:
                        if msg[0] != "ready":
                            self.close()
                            raise RewardError(f"reward function {self.spec!r} failed in a reward "
                                              f"worker process: {msg[1]}")
                        w.ready = True
                    else:
                        tid, status, value = msg
                        results[tid] = (status, value)
                        w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = ("timeout", None)
                    self.kills += 1
                    log.warning("reward call %d of %s passed its time limit: worker pid %d killed",
                                w.task, self.spec, w.proc.pid)
                    self._replace(w)
                elif not w.ready and now >= w.started + self.start_timeout_s:
                    self.close()
                    raise RewardError(f"a reward worker for {self.spec!r} did not start within "
                                      f"{self.start_timeout_s:.0f} s (importing the function); "
                                      "check that it imports quickly on its own")
        return results  # type: ignore[return-value]

    def _died(self, w: _Worker, results: list) -> None:
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if w.task is not None:
            results[w.task] = ("error",
                               f"the reward worker died (exit code {code}) during the call")
            w.task = None
        elif not w.ready:
            self.close()
            raise RewardError(f"a reward worker for {self.spec!r} died while starting (exit code "
                              f"{code})")
        self._replace(w)


if __name__ == "__main__":  # a worker: python -m drpo_megatron.rewards.pool TASK_FD RESULT_FD SPEC
    _worker_main(mpc.Connection(int(sys.argv[1]), writable=False),
                 mpc.Connection(int(sys.argv[2]), readable=False), sys.argv[3])
