"""``reward.kind: http`` against a real HTTP server on 127.0.0.1 (stdlib ``http.server`` in a
thread): batching, concurrency, retries on 503, a slow server (time limit, never a hang), a
failing server (raise or fallback, counted), a refused connection (config error before the first
rollout)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drpo_megatron.rewards.config import HttpRewardConfig, RewardConfig, RewardConfigError
from drpo_megatron.rewards.pool import RewardError
from drpo_megatron.rewards.scorer import RewardScorer
from drpo_megatron.rollout.engine import Sample


class RewardServer:
    """``mode``: ok (reward = len(response) + meta["bonus"]) | slow (sleeps ``delay`` s first) |
    flaky (the first ``failures`` requests answer 503) | fail (500) | short (one reward too
    few).  Records every request body and the most requests it served at once."""

    def __init__(self, mode="ok", delay=0.0, failures=0):
        self.mode, self.delay, self.failures = mode, delay, failures
        self.bodies, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    n_seen = len(server.bodies)
                try:
                    time.sleep(server.delay)
                    if server.mode == "fail" or (server.mode == "flaky" and n_seen <= server.failures):
                        self._send(500 if server.mode == "fail" else 503, {"error": "busy"})
                        return
                    rewards = [float(len(r)) + m.get("bonus", 0.0)
                               for r, m in zip(body["responses"], body["metas"])]
                    if server.mode == "short":
                        rewards = rewards[:-1]
                    self._send(200, {"rewards": rewards})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (slow mode)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    srv = RewardServer(**getattr(request, "param", {}))
    yield srv
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(text: str, **task) -> Sample:
    s = Sample(group_id=0, prompt_ids=[1], response_ids=[2], rollout_logp=[0.0], text=text,
               finish_reason="stop", weight_version="0", answer="1")
    s.meta["prompt"] = "P:" + text
    s.meta["task"] = {"answer": "1", **task}
    return s


def scorer(url, **http) -> RewardScorer:
    top = {k: http.pop(k) for k in ("on_error", "fallback_score", "timeout_score",
                                     "max_failure_frac") if k in http}
    return RewardScorer(RewardConfig(kind="http", http=HttpRewardConfig(url=url, **http), **top))


def test_batches_concurrency_and_fields_reach_the_server(server):
    server.delay = 1.0  # requests overlap (even when the machine is loaded)
    sc = scorer(server.url, batch_size=4, concurrency=2)
    ss = [sample("x" * i, bonus=0.5) for i in range(10)]
    sc(ss)
    assert [s.reward for s in ss] == [i + 0.5 for i in range(10)]
    assert sorted(len(b["responses"]) for b in server.bodies) == [2, 4, 4]
    assert server.max_in_flight == 2
    first = next(b for b in server.bodies if b["responses"][0] == "")
    assert first["prompts"][:2] == ["P:", "P:x"]
    assert first["metas"][1] == {"answer": "1", "bonus": 0.5}
    assert sc.pop_metrics()["rollout/reward/timeout_count"] == 0


@pytest.mark.parametrize("server", [{"mode": "flaky", "failures": 2}], indirect=True)
def test_503_is_retried(server):
    sc = scorer(server.url, retries=2, backoff_s=0.0)
    ss = [sample("abc")]
    sc(ss)
    assert ss[0].reward == 3.0 and len(server.bodies) == 3


@pytest.mark.parametrize("server", [{"mode": "fail"}], indirect=True)
def test_failing_server_raises_naming_the_url_or_falls_back_counted(server):
    with pytest.raises(RewardError, match=rf"reward.http.url='{server.url}'.*HTTP 500"):
        scorer(server.url, retries=1, backoff_s=0.0)([sample("a"), sample("b")])
    assert len(server.bodies) == 2  # one request + one retry
    sc = scorer(server.url, retries=0, on_error="fallback", fallback_score=-3.0,
                max_failure_frac=1.0)
    ss = [sample("a"), sample("b")]
    sc(ss)
    assert [s.reward for s in ss] == [-3.0, -3.0]
    assert sc.pop_metrics()["rollout/reward/fallback_count"] == 2


@pytest.mark.parametrize("server", [{"mode": "short"}], indirect=True)
def test_wrong_reward_count_is_an_error(server):
    with pytest.raises(RewardError, match=r"answered 1 rewards for 2 samples"):
        scorer(server.url)([sample("a"), sample("b")])


@pytest.mark.parametrize("server", [{"mode": "slow", "delay": 30.0}], indirect=True)
def test_slow_server_hits_the_time_limit_never_hangs(server):
    sc = scorer(server.url, timeout_s=0.5, retries=1, backoff_s=0.0, batch_size=2,
                timeout_score=-1.0, max_failure_frac=1.0)
    t0 = time.monotonic()
    ss = [sample("a"), sample("b"), sample("c")]
    sc(ss)
    assert time.monotonic() - t0 < 10  # 2 attempts x 0.5 s per request, not 30 s
    assert [s.reward for s in ss] == [-1.0] * 3
    assert sc.pop_metrics()["rollout/reward/timeout_count"] == 3
    strict = scorer(server.url, timeout_s=0.5, retries=0)  # default max_failure_frac 0.5
    with pytest.raises(RewardError, match=r"2 of 2 samples hit the time limit "
                                          r"\(reward.http.timeout_s=0.5 per request\)"):
        strict([sample("a"), sample("b")])


def test_refused_connection_is_a_config_error_before_the_first_rollout():
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    with pytest.raises(RewardConfigError, match=rf"reward.http.url='{url}': cannot connect to "
                                                r"127.0.0.1:\d+ \(ConnectionRefusedError"):
        scorer(url)


def test_server_gone_mid_run_is_raised_or_counted(server):
    sc = scorer(server.url, retries=1, backoff_s=0.0)
    fb = scorer(server.url, retries=0, on_error="fallback", max_failure_frac=1.0)
    server.stop()  # after the probe
    with pytest.raises(RewardError, match=r"failed after 1 retries: ConnectionError"):
        sc([sample("a")])
    ss = [sample("a")]
    fb(ss)
    assert ss[0].reward == 0.0 and fb.pop_metrics()["rollout/reward/fallback_count"] == 1
