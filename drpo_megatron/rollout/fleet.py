"""A fleet of SGLang servers with client-side dispatch, retries, a health watchdog and
restart + re-sync of dead servers (``rollout.num_servers > 1`` with ``rollout.router: client``;
the sglang-router front in ``rollout/router.py`` builds on it).

Every prompt group is one ``/generate`` request (``n`` samples of one prompt stay on one server,
so a group never mixes weight versions).  Groups are dispatched round-robin over the healthy
servers by a small thread pool (one in-flight request per server).  A request that fails (the
server died, timed out, or answered malformed output) is retried on another server, up to
``max_attempts`` times per group; the failing server is restarted, re-synced to the trainer's
current weights through the ``resync`` callback *before* it is given any request again, and its
``weight_version`` is checked.  Either every group of the step comes back, or the step raises
naming the groups and servers that failed: samples are never silently dropped.  A request that
comes back aborted (``/pause_generation`` around a weight update) is re-issued whole and does
not count as a failure (``keep_aborted=True`` hands it back instead, for partial rollouts:
rollout/partial.py).  :class:`~drpo_megatron.rollout.router.RouterFleet` reuses this
dispatch with sglang-router in front (``rollout.router: sglang-router``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

from drpo_megatron.rollout.engine import Sample, generate_groups
from drpo_megatron.rollout.server import SGLangServer, ServerError, aborted

log = logging.getLogger(__name__)


class GenerationAborted(ServerError):
    """A request came back aborted (``/pause_generation`` around a weight update): re-issued."""


class Fleet:
    def __init__(self, servers: Sequence[SGLangServer], *,
                 resync: Callable[[SGLangServer], None] | None = None,
                 current_version: Callable[[], str] | None = None, max_attempts: int = 3,
                 max_restarts: int = 3, max_aborts: int = 20):
        if not servers:
            raise ValueError("a fleet needs at least one server")
        self.servers = list(servers)
        self.resync = resync
        self.current_version = current_version
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.max_aborts = max_aborts
        self.reissued = 0  # requests re-issued after a weight update aborted them
        self.in_flight = 0  # requests sent and not answered yet (for logs and tests)
        self.restarts = {s.name: 0 for s in self.servers}
        self._lock = threading.Lock()
        # one restart at a time: with asynchronous rollouts the producer and the trainer's eval
        # both run the watchdog, and must not both restart the same dead server
        self._restart_lock = threading.RLock()
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
        """Stop, start, wait healthy, re-sync to the current weights, check the version (skipped
        when another thread restarted ``s`` while this one waited for its turn)."""
        seen = self.restarts[s.name]
        with self._restart_lock:
            if self.restarts[s.name] != seen:
                return
            self._restart(s, reason)

    def _restart(self, s: SGLangServer, reason: str) -> None:
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
            def run(s):
                samples = generate_groups(
                    s, [prompts[g]], [answers[g]], n=n, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=None if seed is None else seed + g,
                    first_group_id=g)
                if any(smp.finish_reason == "abort" for smp in samples):
                    raise GenerationAborted(f"{s.name}: group {g} was aborted (weight update)")
                return samples
            return run

        results = self.dispatch([job(g) for g in range(len(prompts))])
        return [smp for r in results for smp in r]

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any] | list,
                 *, return_logprob: bool = True, top_logprobs_num: int = 0,
                 return_routed_experts: bool = False, keep_aborted: bool = False) -> list[dict]:
        """:meth:`SGLangServer.generate` over the fleet (so a ``Fleet`` can stand in for a server):
        one request per prompt (its ``n`` samples stay on one server), outputs prompt-major.
        A request aborted by ``/pause_generation`` (a weight update) is re-issued whole, so no
        returned sample mixes weight versions; ``keep_aborted``: returned as it is (partial
        rollouts continue it on the new weights)."""

        def job(i):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            want = int(params.get("n", 1) or 1)

            def run(s: SGLangServer):
                outs = s.generate([input_ids[i]], params, return_logprob=return_logprob,
                                  top_logprobs_num=top_logprobs_num,
                                  return_routed_experts=return_routed_experts)
                if len(outs) != want:
                    raise ServerError(f"{s.name}: /generate returned {len(outs)} outputs for one "
                                      f"prompt with n={want}")
                if aborted(outs) and not keep_aborted:
                    raise GenerationAborted(f"{s.name}: request {i} was aborted (weight update)")
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

    # hooks that the router front (rollout/router.py) overrides
    def _lanes(self, down: set[str]) -> list[tuple[str, Any]]:
        """``(key, target)`` pairs that may each hold one in-flight request: here one per
        server, rotated so that consecutive steps start on different servers."""
        return [(s.name, s) for s in self._order()]

    def _pool_size(self) -> int:
        return len(self.servers)

    def _after_failure(self, target: Any, reason: str, down: set[str]
                       ) -> list[tuple[SGLangServer, str]]:
        """The servers to restart after a request on ``target`` failed (each is out of rotation
        until its restart finished)."""
        return [] if self.is_healthy(target) else [(target, reason)]

    def _after_dispatch(self) -> None:
        pass

    def dispatch(self, jobs: list[Callable[[Any], Any]]) -> list[Any]:
        """Run every job on some lane (one in flight per lane), retrying a failed job and
        restarting dead servers (in the pool: the others keep generating); results in job order.
        A job aborted by a weight update is re-issued without counting as a failure."""
        self.watchdog()
        results: dict[int, Any] = {}
        attempts = {g: 0 for g in range(len(jobs))}
        aborts = {g: 0 for g in range(len(jobs))}
        errors: dict[int, list[str]] = {g: [] for g in range(len(jobs))}
        pending = list(range(len(jobs)))
        busy: dict[str, Future] = {}
        owner: dict[Future, tuple[int, Any]] = {}
        down: set[str] = set()

        def restart_in_pool(pool, s: SGLangServer, reason: str) -> None:
            down.add(s.name)
            rfut = pool.submit(self.restart, s, reason)
            busy["restart:" + s.name] = rfut
            owner[rfut] = (-1, s)

        with ThreadPoolExecutor(max_workers=self._pool_size() + len(self.servers),
                                thread_name_prefix="fleet") as pool:
            while pending or busy:
                for key, target in self._lanes(down):
                    if not pending:
                        break
                    if key in busy or key in down:
                        continue
                    g = pending.pop(0)
                    attempts[g] += 1
                    fut = pool.submit(self._counted, jobs[g], target)
                    busy[key] = fut
                    owner[fut] = (g, target)
                if not busy:
                    # every server is down: bring them back here (synchronously), then go on
                    for s in self.servers:
                        if s.name in down:
                            self.restart(s, "no server left to take requests")
                    down.clear()
                    continue
                done, _ = wait(list(busy.values()), return_when=FIRST_COMPLETED)
                for fut in done:
                    g, target = owner.pop(fut)
                    del busy[next(k for k, f in busy.items() if f is fut)]
                    if g == -1:  # a restart: raises if the server could not be brought back
                        fut.result()
                        down.discard(target.name)
                        continue
                    try:
                        results[g] = fut.result()
                    except GenerationAborted as e:
                        attempts[g] -= 1  # not a failure: re-issued after the update
                        aborts[g] += 1
                        self.reissued += 1
                        if aborts[g] > self.max_aborts:
                            raise ServerError(f"request {g} aborted {aborts[g]} times in a row "
                                              f"(weight updates keep pausing the servers): {e}") from e
                        log.info("%s; re-issuing it", e)
                        pending.insert(0, g)
                    except ServerError as e:
                        first = str(e).splitlines()[0]
                        errors[g].append(f"{target.name}: {first}")
                        log.warning("request %d failed on %s (attempt %d): %s", g, target.name,
                                    attempts[g], first)
                        if attempts[g] >= self.max_attempts:
                            raise ServerError(
                                f"request {g} failed {attempts[g]} times (rollout.max_attempts): "
                                + "; ".join(errors[g])) from e
                        pending.insert(0, g)
                        for s, why in self._after_failure(target, f"request failed: {first[:200]}",
                                                          down):
                            restart_in_pool(pool, s, why)
        missing = [g for g in range(len(jobs)) if g not in results]
        if missing:
            raise ServerError(f"rollout lost requests {missing}")
        self._after_dispatch()
        return [results[g] for g in range(len(jobs))]

    def _counted(self, job: Callable[[Any], Any], target: Any) -> Any:
        with self._lock:
            self.in_flight += 1
        try:
            return job(target)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _order(self) -> list[SGLangServer]:
        k = self._rr % len(self.servers)
        self._rr += 1
        return self.servers[k:] + self.servers[:k]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


class SingleServerFront(Fleet):
    """The front of the default one-server run: whole batches go to the server as one request
    (as without a fleet: the server batches them itself), and a server that died is restarted,
    re-synced to the current weights, version-checked and given the batch again (up to
    ``max_attempts``), as a :class:`Fleet` does for each of its servers."""

    def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any] | list,
                 *, return_logprob: bool = True, top_logprobs_num: int = 0,
                 return_routed_experts: bool = False, keep_aborted: bool = False) -> list[dict]:
        """The batch as one request; the prompts whose outputs a weight push aborted are
        re-issued (only those: the finished ones are kept), or with ``keep_aborted`` returned
        as they are."""
        s = self.servers[0]
        self.watchdog()
        n_out = [int((p if isinstance(p, dict) else {}).get("n", 1) or 1) for p in
                 (sampling_params if isinstance(sampling_params, list)
                  else [sampling_params] * len(input_ids))]
        todo = list(range(len(input_ids)))  # prompts still to generate
        results: dict[int, list[dict]] = {}
        aborts = 0
        attempt = 0
        while todo:
            attempt += 1
            params = ([sampling_params[i] for i in todo] if isinstance(sampling_params, list)
                      else sampling_params)
            try:
                batch = [input_ids[i] for i in todo]
                outs = self._counted(lambda srv, b=batch, p=params: srv.generate(
                    b, p, return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
                    return_routed_experts=return_routed_experts), s)
            except ServerError as e:
                first = str(e).splitlines()[0]
                if attempt >= self.max_attempts or self.is_healthy(s):
                    raise  # the server is fine (a bad request) or keeps failing: no retry
                log.warning("batch failed on %s (attempt %d): %s", s.name, attempt, first)
                self.restart(s, f"request failed: {first[:200]}")
                continue
            want = sum(n_out[i] for i in todo)
            if len(outs) != want:
                raise ServerError(f"{s.name}: /generate returned {len(outs)} outputs for "
                                  f"{len(todo)} prompts (expected {want})")
            again, off = [], 0
            for i in todo:  # outputs are prompt-major: prompt i owns the next n_out[i]
                mine = outs[off:off + n_out[i]]
                off += n_out[i]
                if aborted(mine) and not keep_aborted:
                    again.append(i)
                else:
                    results[i] = mine
            todo = again
            if not todo:
                break
            aborts += 1  # a weight push paused the server mid-batch: re-issue the aborted prompts
            attempt -= 1
            self.reissued += len(todo)
            if aborts > self.max_aborts:
                raise ServerError(f"{s.name}: batch aborted {aborts} times in a row (weight updates "
                                  "keep pausing the server)")
        return [o for i in range(len(input_ids)) for o in results[i]]
