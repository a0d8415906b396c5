"""Several SGLang servers behind sglang-router (``rollout.router: sglang-router``), or behind a
router somebody else runs (``rollout.router_url`` / env ``DRPO_ROUTER_URL``).

* :class:`SGLangRouter` launches ``python -m sglang_router.launch_router`` (sglang-router 0.3.2,
  log ``<run>/logs/router.log``) or attaches to a running one, and talks to its worker API:
  ``GET /workers``, ``POST /workers {"url": ...}``, ``DELETE /workers/{id}``.  Every wait has a
  timeout and logs what it waits for (which workers are not registered and healthy yet); a
  router that exits or times out raises :class:`RouterError` naming its log with the log's tail.
* :class:`RouterFleet` is what the loop calls ``generate`` on (the same signature as
  :meth:`SGLangServer.generate`): every prompt (group) is one ``/generate`` request to the
  router, a few in flight per worker, and the router picks the worker.  It reuses
  :class:`~drpo_megatron.rollout.fleet.Fleet`'s dispatch (retries up to ``max_attempts``,
  aborted requests re-issued, results in order or a clear error) and watchdog; a dead worker is
  first removed from the router, then restarted, re-synced to the trainer's current weights
  (the ``resync`` callback) and its ``weight_version`` checked, and only then registered again.
  Weight updates never go through the router: the transports push to each worker directly.
* :class:`RolloutSetup` is what ``run.build_run`` uses: it starts (or attaches to) the servers
  and the router and builds the front.  Weight pushes are bracketed by ``/pause_generation`` ...
  ``/continue_generation`` in ``weights/sync.py`` (``PausedTransport``).
* Authentication (:mod:`drpo_megatron.rollout.auth`): with an API key (:func:`rollout_api_key`)
  every server and router we launch requires it (the router on ``/workers`` and ``/generate``
  too), binds to loopback, and every request of ours carries it; an external router and its
  workers get the key of ``rollout.api_key_file`` / ``$DRPO_API_KEY_FILE``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import requests

from drpo_megatron.dist import free_port
from drpo_megatron.rollout.auth import (API_KEY_FILE_ENV, ApiKey, create_key_file,
                                        key_from_env, read_key_file)
from drpo_megatron.rollout.fleet import Fleet, SingleServerFront
from drpo_megatron.rollout.server import (HEALTH_POLL_S, LOG_EVERY_S, ManagedProcess,
                                          ServerConfig, ServerError, SGLangServer, tail)

log = logging.getLogger(__name__)

ROUTER_URL_ENV = "DRPO_ROUTER_URL"
#: rollout.router_policy: sglang-router's --policy
RouterPolicy = Literal["round_robin", "cache_aware", "power_of_two", "random"]
ROUTER_POLICIES = get_args(RouterPolicy)
#: rollout.router with several servers: sglang-router in front, or drpo's own client dispatch
RouterKind = Literal["sglang-router", "client"]


def plain_tail(path: Path) -> str:
    """The log's last lines without the router's ANSI colour codes (it colours even into a file)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", tail(path))


class RouterError(ServerError):
    """sglang-router failed to start, died, or its workers did not register in time."""


class SGLangRouter(ManagedProcess):
    """sglang-router: a subprocess we launch (``url=None``) or a running one at ``url``."""

    error = RouterError

    def __init__(self, log_dir: str | os.PathLike, *, url: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, policy: str = "round_robin",
                 startup_timeout_s: float = 300.0, request_timeout_s: float = 300.0,
                 extra_args: Sequence[str] = (), name: str = "router",
                 api_key: ApiKey | None = None):
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy {policy!r}: choose one of {ROUTER_POLICIES}")
        self.name = name
        self.external = url is not None
        self.host = host
        self.port = port or (0 if url else free_port(host))
        self.url = url.rstrip("/") if url else f"http://{host}:{self.port}"
        self.policy = policy
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.extra_args = list(extra_args)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._session = requests.Session()
        self._lock = threading.Lock()
        self._use_key(api_key)

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        # with a key: stock sglang-router started through rollout/launch.py, which adds the
        # key flags (auth.router_key_args)
        launcher = (["-m", "drpo_megatron.rollout.launch", "router"] if self.api_key is not None
                    else ["-m", "sglang_router.launch_router"])
        return [
            sys.executable, *launcher,
            "--host", self.host, "--port", str(self.port),
            "--policy", self.policy,
            # workers are registered through POST /workers once they are healthy
            "--worker-urls",
            "--request-timeout-secs", str(int(self.request_timeout_s)),
            "--worker-startup-timeout-secs", str(int(self.startup_timeout_s)),
            "--worker-startup-check-interval", "1",
            "--health-check-interval-secs", "10",
            "--prometheus-host", self.host,
            "--prometheus-port", str(free_port(self.host)),
            "--log-level", "info",
            *self.extra_args,
        ]

    def log_tail(self) -> str:
        return plain_tail(self.log_path)

    def wait_up(self, timeout_s: float | None = None) -> None:
        """Until the router answers ``/health``."""
        self.wait_health(timeout_s or self.startup_timeout_s, "rollout.server.startup_timeout_s")

    # ------------------------------------------------------------------ worker API
    def _call(self, method: str, path: str, what: str, **kw) -> Any:
        self.check_alive()
        try:
            r = self._session.request(method, self.url + path, timeout=30, **kw)
        except requests.RequestException as e:
            self.check_alive()
            raise RouterError(f"{self.name}: {what} ({method} {self.url}{path}) failed: {e}; "
                              f"{self.where()}") from e
        if r.status_code >= 300:
            raise RouterError(f"{self.name}: {what} ({method} {path}) returned HTTP "
                              f"{r.status_code}: {r.text[:300]}; {self.where()}")
        return self.json_body(r, what, path)

    def workers(self) -> list[dict]:
        """``GET /workers``: ``[{"id", "url", "is_healthy", ...}, ...]``."""
        out = self._call("GET", "/workers", "list workers")
        return list(out.get("workers", [])) if isinstance(out, dict) else []

    def healthy_urls(self) -> list[str]:
        return [w["url"].rstrip("/") for w in self.workers() if w.get("is_healthy")]

    def add_worker(self, url: str) -> None:
        """Register ``url`` (the router adds it in the background after its own health check:
        follow with :meth:`wait_workers`)."""
        with self._lock:
            self._call("POST", "/workers", f"add worker {url}", json={"url": url})
        log.info("%s: registered %s", self.name, url)

    def remove_worker(self, url: str) -> None:
        """Deregister ``url`` (no request is routed to it any more) and wait until it is gone."""
        url = url.rstrip("/")
        with self._lock:
            ids = [w["id"] for w in self.workers() if w.get("url", "").rstrip("/") == url]
            for wid in ids:
                self._call("DELETE", f"/workers/{wid}", f"remove worker {url}")
        t0 = time.time()
        while any(w.get("url", "").rstrip("/") == url for w in self.workers()):
            if time.time() - t0 > 60:
                raise RouterError(f"{self.name}: worker {url} still listed 60s after its "
                                  f"removal; {self.where()}")
            time.sleep(0.2)
        if ids:
            log.info("%s: deregistered %s", self.name, url)

    def wait_workers(self, urls: Sequence[str] = (), *, count: int = 0,
                     timeout_s: float | None = None) -> list[str]:
        """Until every url in ``urls`` (and at least ``count`` workers) is registered and
        healthy; logs which are missing every few seconds.  Returns the healthy worker urls."""
        want = {u.rstrip("/") for u in urls}
        count = max(count, len(want))
        timeout_s = timeout_s or self.startup_timeout_s
        t0 = last = time.time()
        while True:
            try:
                have = self.healthy_urls()
            except RouterError:
                self.check_alive()
                have = []
            missing = sorted(want - set(have))
            if not missing and len(have) >= count:
                log.info("%s: %d healthy workers registered after %.1fs", self.name, len(have),
                         time.time() - t0)
                return have
            now = time.time()
            what = (f"workers {missing}" if missing else "") + (
                f"{' and ' if missing else ''}{count} workers (have {len(have)}: {have})"
                if len(have) < count else "")
            if now - t0 > timeout_s:
                raise RouterError(f"{self.name} at {self.url}: still waiting for {what} to be "
                                  f"registered and healthy after {timeout_s:.0f}s; "
                                  f"{self.where()}")
            if now - last > LOG_EVERY_S:
                log.info("waiting for %s at %s to list %s (%.0fs of %.0fs; log: %s)", self.name,
                         self.url, what, now - t0, timeout_s, self.log_path)
                last = now
            time.sleep(HEALTH_POLL_S)

    def client(self, cfg: ServerConfig) -> SGLangServer:
        """An :class:`SGLangServer` client whose ``/generate`` goes to the router (the router
        process, if ours, is checked for life on every call)."""
        c = SGLangServer.attach(self.url, cfg, self.log_path.parent, name=self.name,
                                api_key=self.api_key)
        c.log_path = self.log_path
        c.proc = self.proc
        c.external = True  # never started or stopped through the client
        return c


class RouterFleet(Fleet):
    """The loop's front for several workers behind sglang-router (see the module doc)."""

    def __init__(self, router: SGLangRouter, servers: Sequence[SGLangServer], *,
                 client_cfg: ServerConfig | None = None, inflight_per_worker: int = 2,
                 register_timeout_s: float | None = None, **fleet_kw):
        super().__init__(servers, **fleet_kw)
        self.router = router
        cfg = client_cfg or self.servers[0].cfg
        self.inflight = max(1, inflight_per_worker * len(self.servers))
        # one router client (own HTTP session) per lane: lanes run in parallel threads
        self.clients = [router.client(cfg) for _ in range(self.inflight)]
        self.register_timeout_s = register_timeout_s

    @property
    def name(self) -> str:
        return f"{self.router.name}[" + ",".join(s.name for s in self.servers) + "]"

    # every lane sends to the router; none while every worker is being restarted
    def _lanes(self, down: set[str]) -> list[tuple[str, Any]]:
        if all(s.name in down for s in self.servers):
            return []
        return [(f"lane-{i}", c) for i, c in enumerate(self.clients)]

    def _pool_size(self) -> int:
        return self.inflight

    def _after_failure(self, target: Any, reason: str, down: set[str]
                       ) -> list[tuple[SGLangServer, str]]:
        self.router.check_alive()  # a dead router is not something a retry fixes
        return [(s, reason) for s in self.servers
                if s.name not in down and not self.is_healthy(s)]

    def _after_dispatch(self) -> None:
        # the router may have hidden a worker's death by retrying elsewhere: restart it now
        self.watchdog()

    def restart(self, s: SGLangServer, reason: str) -> None:
        """Deregister, restart + re-sync + version check (:meth:`Fleet.restart`), register."""
        try:
            self.router.remove_worker(s.url)
        except RouterError as e:
            log.warning("%s", str(e).splitlines()[0])
        super().restart(s, reason)
        self.router.add_worker(s.url)
        self.router.wait_workers([s.url], timeout_s=self.register_timeout_s)
        self.events.append(f"{s.name} registered with {self.router.name} again")

    def stop(self) -> None:
        super().stop()
        self.router.stop()


def resolve_router_url(rollout_cfg) -> tuple[str | None, str]:
    """The external router to use: ``rollout.router_url`` when set, else env
    ``DRPO_ROUTER_URL``; returns ``(url, where it came from)``."""
    cfg_url = getattr(rollout_cfg, "router_url", None)
    env_url = os.environ.get(ROUTER_URL_ENV) or None
    if cfg_url:
        if env_url and env_url.rstrip("/") != cfg_url.rstrip("/"):
            log.warning("rollout.router_url=%s overrides %s=%s", cfg_url, ROUTER_URL_ENV, env_url)
        return cfg_url, "rollout.router_url"
    if env_url:
        return env_url, ROUTER_URL_ENV
    return None, ""


KEY_FILE = Path("secrets") / "api_key"  # under the run directory


def rollout_api_key(rollout_cfg, run_dir: str | os.PathLike) -> ApiKey | None:
    """The API key of this run's engines (docs/operate.md, Security):

    * ``rollout.api_key_file`` when set, else ``$DRPO_API_KEY_FILE`` (what the SLURM template
      exports), checked by :func:`~drpo_megatron.rollout.auth.read_key_file` (must exist, be
      0600 and hold one key);
    * otherwise, when drpo launches the servers itself: a new random key in
      ``<run_dir>/secrets/api_key`` (0600; replaced at every start);
    * otherwise (an external router without a key): None, with a warning that every request
      goes out unauthenticated.
    """
    path = getattr(rollout_cfg, "api_key_file", None)
    if path:
        key = read_key_file(path, "rollout.api_key_file")
    else:
        key = key_from_env()
    if key is None and resolve_router_url(rollout_cfg)[0] is None:
        key = create_key_file(Path(run_dir) / KEY_FILE)
        log.info("rollout API key: new per-run key in %s (mode 0600)", key.path)
    elif key is None:
        log.warning("external router without an API key (neither rollout.api_key_file nor %s is "
                    "set): its workers' weight-update endpoints are open to anyone who can reach "
                    "them; see docs/operate.md, Security", API_KEY_FILE_ENV)
    else:
        log.info("rollout API key: %s", key.path)
    return key


class RolloutSetup:
    """The rollout side of a run (driver rank): servers, router and front.

    Use: ``r = RolloutSetup(cfg.rollout, policy, log_dir, driver)``; ``r.start()`` (before the
    actor builds: servers load meanwhile); ``r.wait_ready()``;
    ``front = r.front(resync)``; on error ``r.stop()``.  On a non-driver rank everything is empty
    and ``front`` is ``None``.
    """

    def __init__(self, rcfg, policy: str | os.PathLike, log_dir: str | os.PathLike,
                 driver: bool = True, api_key: ApiKey | None = None):
        self.rcfg = rcfg
        self.api_key = api_key
        self.policy = Path(policy)
        self.log_dir = Path(log_dir)
        self.driver = driver
        self.router: SGLangRouter | None = None
        self.servers: list[SGLangServer] = []
        self.router_url, self.router_url_from = resolve_router_url(rcfg) if driver else (None, "")
        n = rcfg.num_servers
        if not driver:
            return
        if self.router_url:
            self.router = SGLangRouter(self.log_dir, url=self.router_url,
                                       startup_timeout_s=rcfg.server.startup_timeout_s,
                                       request_timeout_s=rcfg.server.request_timeout_s,
                                       api_key=api_key)
        else:
            self.servers = [SGLangServer(self.policy, rcfg.server, self.log_dir, name=f"sglang-{i}",
                                         api_key=api_key)
                            for i in range(n)]
            if n > 1 and rcfg.router == "sglang-router":
                # on the servers' host: loopback by default, like them
                self.router = SGLangRouter(self.log_dir, host=rcfg.server.host,
                                           policy=rcfg.router_policy,
                                           startup_timeout_s=rcfg.server.startup_timeout_s,
                                           request_timeout_s=rcfg.server.request_timeout_s,
                                           api_key=api_key)

    def start(self) -> "RolloutSetup":
        if self.router is not None:
            self.router.start()
        if self.servers:
            self.servers[0].start()
        return self

    def wait_ready(self) -> None:
        """Every server healthy at weight version "0" and registered with the router."""
        if not self.driver:
            return
        if self.router is not None and self.router.external:
            n = self.rcfg.num_servers
            log.info("external router %s (from %s): not launching servers; waiting for %d "
                     "workers", self.router.url, self.router_url_from, n)
            self.router.wait_up()
            urls = self.router.wait_workers(count=n)
            self.servers = [SGLangServer.attach(u, self.rcfg.server, self.log_dir,
                                                name=f"worker-{i}", model_path=self.policy,
                                                api_key=self.api_key)
                            for i, u in enumerate(sorted(urls))]
        else:
            if self.servers:
                self.servers[0].wait_healthy()
            if self.router is not None:
                self.router.wait_up()
                self.router.add_worker(self.servers[0].url)
            for s in self.servers[1:]:  # one at a time: SGLang sizes its KV pool from free RAM
                s.start().wait_healthy()
                if self.router is not None:
                    self.router.add_worker(s.url)
            if self.router is not None:
                self.router.wait_workers([s.url for s in self.servers])
        for s in self.servers:
            s.set_weight_version("0")

    def front(self, resync: Callable[[SGLangServer, int], None] | None = None, *,
              current_version: Callable[[], int] = lambda: 0, max_attempts: int = 3):
        """What the loop generates through: the one server, a client-side :class:`Fleet`, or a
        :class:`RouterFleet`.  ``resync(server, version)`` pushes ``version`` to one server;
        ``current_version()`` is the last version pushed (weights/sync.py's PausedTransport)."""
        if not self.driver:
            return None
        rs = None if resync is None else (lambda s: resync(s, int(current_version())))
        kw = dict(resync=rs, current_version=lambda: str(current_version()),
                  max_attempts=max_attempts)
        if self.router is not None:
            return RouterFleet(self.router, self.servers, **kw)
        if len(self.servers) > 1:
            return Fleet(self.servers, **kw)
        return SingleServerFront(self.servers, **kw)  # restarts a dead server like a Fleet

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        if self.router is not None:
            self.router.stop()
