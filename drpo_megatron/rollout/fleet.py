"""A fleet of SGLang servers with client-side dispatch, retries, a health watchdog and
restart + re-sync of dead servers (``rollout.num_servers > 1`` with ``rollout.router: client``).

Every prompt group is one ``/generate`` request (``n`` samples of one prompt stay on one server,
so a group never mixes weight versions).  Groups are dispatched round-robin over the healthy
servers by a small thread pool (one in-flight request per server).  A request that fails (the
server died, timed out, or answered malformed output) is retried on another server, up to
``max_attempts`` times per group; the failing server is restarted, re-synced to the trainer's
current weights through the ``resync`` callback *before* it is given any request again, and its
``weight_version`` is checked.  Either every group of the step comes back, or the step raises
naming the groups and servers that failed: samples are never silently dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

from drpo_megatron.rollout.engine import Sample, generate_groups
from drpo_megatron.rollout.server import SGLangServer, ServerError

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, servers: Sequence[SGLangServer], *,
                 resync: Callable[[SGLangServer], None] | None = None,
                 current_version: Callable[[], str] | None = None, max_attempts: int = 3,
                 max_restarts: int = 3):
        if not servers:
            raise ValueError("a fleet needs at least one server")
        self.servers = list(servers)
        self.resync = resync
        self.current_version = current_version
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.restarts = {s.name: 0 for s in self.servers}
        self._lock = threading.Lock()
        self._rr = 0
        self.events: list[str] = []  # what the watchdog did (for logs and tests)

    # ------------------------------------------------------------------ health
    def is_healthy(self, s: SGLangServer) -> bool:
        if s.proc is not None and s.proc.poll() is not None:
            return False
        try:
            r = s._session.get(s.url + "/health", timeout=5)
            return r.status_code == 200
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return False

    def restart(self, s: SGLangServer, reason: str) -> None:
        """Stop, start, wait healthy, re-sync to the current weights, check the version."""
        with self._lock:
            self.restarts[s.name] += 1
            n = self.restarts[s.name]
        if n > self.max_restarts:
            raise ServerError(f"{s.name} failed again ({reason}) after {self.max_restarts} restarts "
                              f"(rollout.max_server_restarts); see {s.log_path}")
        msg = f"restarting {s.name} ({reason}); restart {n} of at most {self.max_restarts}"
        log.warning(msg)
        self.events.append(msg)
        s.stop()
        s.start()
        s.wait_healthy()
        if self.resync is not None:
            self.resync(s)
        if self.current_version is not None:
            want = self.current_version()
            got = s.weight_version()
            if got != want:
                raise ServerError(f"{s.name} restarted at weight_version {got!r}, the trainer is at "
                                  f"{want!r}: re-sync failed; see {s.log_path}")
        self.events.append(f"{s.name} back at weight version {s.weight_version()}")

    def watchdog(self) -> None:
        """Restart every dead or unhealthy server (called before each rollout and eval)."""
        for s in self.servers:
            if not self.is_healthy(s):
                self.restart(s, "health check failed")

    # ------------------------------------------------------------------ dispatch
    def generate_groups(self, prompts: Sequence[list[int]], answers: Sequence[str], *, n: int,
                        temperature: float, top_p: float, max_new_tokens: int,
                        seed: int | None = None) -> list[Sample]:
        """Like :func:`engine.generate_groups` over the fleet; group-major, all groups or raise."""

        def job(g):
            return lambda s: generate_groups(
                s, [prompts[g]], [answers[g]], n=n, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, seed=None if seed is None else seed + g,
                first_group_id=g)

        results = self.dispatch([job(g) for g in range(len(prompts))])
        return [smp for r in results for smp in r]

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any] | list,
                 *, return_logprob: bool = True, top_logprobs_num: int = 0) -> list[dict]:
        """:meth:`SGLangServer.generate` over the fleet (so a ``Fleet`` can stand in for a server):
        one request per prompt (its ``n`` samples stay on one server), outputs prompt-major."""

        def job(i):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            want = int(params.get("n", 1) or 1)

            def run(s: SGLangServer):
                outs = s.generate([input_ids[i]], params, return_logprob=return_logprob,
                                  top_logprobs_num=top_logprobs_num)
                if len(outs) != want:
                    raise ServerError(f"{s.name}: /generate returned {len(outs)} outputs for one "
                                      f"prompt with n={want}")
                return outs
            return run

        results = self.dispatch([job(i) for i in range(len(input_ids))])
        return [o for r in results for o in r]

    # the server-like surface used by the loop (name, log_path, weight_version, stop)
    @property
    def name(self) -> str:
        return "fleet[" + ",".join(s.name for s in self.servers) + "]"

    @property
    def log_path(self):
        return self.servers[0].log_path.parent

    def weight_version(self) -> str:
        return self.servers[0].weight_version()

    def dispatch(self, jobs: list[Callable[[SGLangServer], Any]]) -> list[Any]:
        """Run every job on some healthy server (one in flight per server), retrying a failed
        job elsewhere and restarting its server if it died; results in job order."""
        self.watchdog()
        results: dict[int, Any] = {}
        attempts = {g: 0 for g in range(len(jobs))}
        errors: dict[int, list[str]] = {g: [] for g in range(len(jobs))}
        pending = list(range(len(jobs)))
        busy: dict[str, Future] = {}
        owner: dict[Future, tuple[int, SGLangServer]] = {}
        down: set[str] = set()

        with ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="fleet") as pool:
            while pending or busy:
                for s in self._order():
                    if not pending:
                        break
                    if s.name in busy or s.name in down:
                        continue
                    g = pending.pop(0)
                    attempts[g] += 1
                    fut = pool.submit(jobs[g], s)
                    busy[s.name] = fut
                    owner[fut] = (g, s)
                if not busy:
                    # every server is down: bring them back here (synchronously), then go on
                    for s in self.servers:
                        if s.name in down:
                            self.restart(s, "no server left to take requests")
                    down.clear()
                    continue
                done, _ = wait(list(busy.values()), return_when=FIRST_COMPLETED)
                for fut in done:
                    g, s = owner.pop(fut)
                    del busy[s.name]
                    if g == -1:  # a restart: raises if the server could not be brought back
                        fut.result()
                        down.discard(s.name)
                        continue
                    try:
                        results[g] = fut.result()
                    except ServerError as e:
                        first = str(e).splitlines()[0]
                        errors[g].append(f"{s.name}: {first}")
                        log.warning("request %d failed on %s (attempt %d): %s", g, s.name,
                                    attempts[g], first)
                        if attempts[g] >= self.max_attempts:
                            raise ServerError(
                                f"request {g} failed {attempts[g]} times (rollout.max_attempts): "
                                + "; ".join(errors[g])) from e
                        pending.insert(0, g)
                        if not self.is_healthy(s):
                            down.add(s.name)
                            # restart in the pool: the other servers keep generating meanwhile
                            rfut = pool.submit(self.restart, s, f"request failed: {first[:200]}")
                            busy[s.name] = rfut
                            owner[rfut] = (-1, s)
        missing = [g for g in range(len(jobs)) if g not in results]
        if missing:
            raise ServerError(f"rollout lost requests {missing}")
        return [results[g] for g in range(len(jobs))]

    def _order(self) -> list[SGLangServer]:
        k = self._rr % len(self.servers)
        self._rr += 1
        return self.servers[k:] + self.servers[:k]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
