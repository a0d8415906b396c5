"""``reward.kind: http``: a remote reward server (e.g. a reward model served elsewhere).

Protocol: ``POST reward.http.url`` with the JSON body
``{"prompts": [str], "responses": [str], "metas": [dict]}`` (``http.batch_size`` samples per
request) answered by ``{"rewards": [number | {"score": number, ...}, ...]}`` of the same length.

Retries are urllib3's ``Retry`` through a ``requests`` ``HTTPAdapter``: ``http.retries`` extra
attempts on connection errors, read timeouts and HTTP 429 / 500 / 502 / 503 / 504 (honouring
``Retry-After``), with exponential backoff (``http.backoff_s``).  ``http.concurrency`` requests are
in flight at once.  Every attempt has ``http.timeout_s`` to connect and ``http.timeout_s``
between received bytes; on top, a wall-clock guard gives up on requests still running after all
their attempts could have ended, so a call never hangs.  Before the first rollout
:meth:`HttpReward.probe` opens a TCP connection to the URL's host and port: a refused
connection is a config error naming ``reward.http.url``.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import socket
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from drpo_megatron.rewards.config import HttpRewardConfig, RewardConfigError

RETRY_STATUS = (429, 500, 502, 503, 504)
# seconds the TCP probe before the first rollout may take
PROBE_TIMEOUT_S = 10.0
# urllib3 caps one backoff sleep at this (Retry.DEFAULT_BACKOFF_MAX)
BACKOFF_MAX_S = 120.0


def _is_timeout(exc: BaseException) -> bool:
    """A requests exception caused by a connect / read timeout (requests reports a read timeout
    that exhausted the retries as a ConnectionError wrapping urllib3's MaxRetryError)."""
    if isinstance(exc, requests.Timeout):
        return True
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        # urllib3 derives NewConnectionError (refused, unreachable) from ConnectTimeoutError
        if isinstance(e, (Urllib3Timeout, socket.timeout)) and \
                not isinstance(e, NewConnectionError):
            return True
        stack.extend([getattr(e, "reason", None), e.__cause__, e.__context__,
                      *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]])
    return False


class HttpReward:
    """Batched POSTs to ``cfg.url`` with retries, concurrency and a hard wall-clock bound."""

    def __init__(self, cfg: HttpRewardConfig):
        self.cfg = cfg
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries,
                      status=cfg.retries, other=0, backoff_factor=cfg.backoff_s,
                      status_forcelist=RETRY_STATUS, allowed_methods=None,  # POST too
                      raise_on_status=False, respect_retry_after_header=True)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1,
                              pool_maxsize=cfg.concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(cfg.headers)

    @property
    def max_request_s(self) -> float:
        """Longest one request can take with all its attempts: per attempt a connect timeout and
        a read timeout (a server trickling bytes can stretch a read; the guard cuts it), plus the
        backoff sleeps; + 1 s of slack."""
        c = self.cfg
        sleeps = sum(min(BACKOFF_MAX_S, c.backoff_s * 2 ** (k - 1))
                     for k in range(2, c.retries + 2))
        return (c.retries + 1) * 2 * c.timeout_s + sleeps + 1.0

    def probe(self) -> None:
        """Connect to the URL's host:port once (before the first rollout)."""
        parts = urlsplit(self.cfg.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port),
                                          timeout=min(PROBE_TIMEOUT_S, self.cfg.timeout_s)):
                pass
        except OSError as e:
            raise RewardConfigError(
                f"reward.http.url={self.cfg.url!r}: cannot connect to {parts.hostname}:{port} "
                f"({type(e).__name__}: {e}); start the reward server first, or fix the URL"
            ) from None

    def _post(self, prompts, responses, metas) -> tuple[str, Any]:
        c = self.cfg
        try:
            r = self.session.post(c.url, json={"prompts": prompts, "responses": responses,
                                               "metas": metas},
                                  timeout=(c.timeout_s, c.timeout_s))
        except requests.RequestException as e:
            status = "timeout" if _is_timeout(e) else "error"
            return status, f"POST {c.url} failed after {c.retries} retries: {type(e).__name__}: {e}"
        if not r.ok:
            return "error", f"POST {c.url} answered HTTP {r.status_code}: {r.text[:200]!r}"
        try:
            body = r.json()
        except ValueError:
            return "error", f"POST {c.url} answered non-JSON: {r.text[:200]!r}"
        rewards = body.get("rewards") if isinstance(body, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(prompts):
            got = (f"{len(rewards)} rewards" if isinstance(rewards, list) else
                   f"keys {sorted(body)}" if isinstance(body, dict) else type(body).__name__)
            return "error", (f"POST {c.url} answered {got} for {len(prompts)} samples; expected "
                             '{"rewards": [one number or {"score": ...} per sample]}')
        return "ok", rewards

    def score(self, prompts: list[str], responses: list[str],
              metas: list[dict]) -> list[tuple[str, Any]]:
        """One ``(status, value)`` per sample: ``("ok", reward)``, ``("timeout", msg)`` or
        ``("error", msg)``; never takes longer than the requests' bound (``max_request_s`` per
        round of ``concurrency`` requests)."""
        c = self.cfg
        n = len(prompts)
        starts = list(range(0, n, c.batch_size))
        out: list[tuple[str, Any]] = [("timeout", None)] * n
        ex = cf.ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="drpo-http-reward")
        try:
            futures = {ex.submit(self._post, prompts[s:s + c.batch_size],
                                 responses[s:s + c.batch_size], metas[s:s + c.batch_size]): s
                       for s in starts}
            guard = math.ceil(len(starts) / c.concurrency) * self.max_request_s
            done, _ = cf.wait(futures, timeout=guard)
            for f, s in futures.items():
                size = min(c.batch_size, n - s)
                if f in done:
                    status, value = f.result()
                    if status == "ok":
                        out[s:s + size] = [("ok", v) for v in value]
                        continue
                else:
                    status, value = "timeout", (f"POST {c.url} still running after {guard:.0f} s "
                                                "(all attempts' time)")
                out[s:s + size] = [(status, value)] * size
        finally:
            # requests past the guard are abandoned, not waited for (their sockets time out)
            ex.shutdown(wait=False, cancel_futures=True)
        return out

    def close(self) -> None:
        self.session.close()

