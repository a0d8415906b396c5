"""Reward calls in worker processes, each with a hard time limit.

A Python thread cannot be stopped, and math-verify's own timeout (``signal.alarm``) works only in
the main thread and only where the running code lets the signal handler in.  So every reward call
runs in one of ``num_workers`` spawned worker processes that import the reward function once
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
import multiprocessing
import multiprocessing.connection as mpc
import signal
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A new worker must have imported the reward function within this time (spawn + imports of
# sympy / the user's module on a loaded machine take seconds, not minutes).
START_TIMEOUT_S = 300.0
# How long close() waits for a worker to exit after asking it to, before SIGKILL.
STOP_GRACE_S = 2.0


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


def _worker_main(conn, spec: str) -> None:
    """A worker: import ``spec``, say ready, then answer ``(task_id, mode, payload)`` messages
    until ``None`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
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
            msg = conn.recv()
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
    proc: Any
    conn: Any
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
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded trainer
        self._workers: list[_Worker] = []
        self.kills = 0  # workers killed at a deadline (for tests and logs)

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True,
                                 name="drpo-reward-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent, time.monotonic())

    def start(self) -> None:
        """Start the workers (they import in the background); idempotent."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _replace(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        end = time.monotonic() + STOP_GRACE_S
        for w in self._workers:
            w.proc.join(timeout=max(0.0, end - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=10)
            w.conn.close()
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
                    w.conn.send((i, mode, payload))
                    w.task, w.deadline = i, time.monotonic() + limit
            now = time.monotonic()
            due = [w.deadline if w.ready else w.started + self.start_timeout_s
                   for w in self._workers if w.task is not None or not w.ready]
            timeout = max(0.0, min(due) - now) if due else None
            handles = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            ready = set(mpc.wait(handles, timeout))
            for w in list(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the worker died (segfault, OOM kill, os._exit ...)
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
                elif w.proc.sentinel in ready:
                    self._died(w, results)
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
        w.proc.join(timeout=5)
        code = w.proc.exitcode
        if w.task is not None:
            results[w.task] = ("error", f"the reward worker died (exit code {code}) during the call")
            w.task = None
        elif not w.ready:
            self.close()
            raise RewardError(f"a reward worker for {self.spec!r} died while starting (exit code "
                              f"{code})")
        self._replace(w)
