"""Two real SGLang CPU servers behind a real sglang-router (rollout/router.py).

* after a weight sync every group of a step comes back at the pushed weight_version;
* a weight push while generation is in flight pauses the servers (abort): the aborted requests
  are re-issued and no returned sample carries tokens of two weight versions;
* a server killed mid-rollout is deregistered, restarted, re-synced and registered again, and
  every sample of the step is accounted for;
* external-router mode (DRPO_ROUTER_URL) launches no server and syncs + generates through a
  router started here;
* a router that cannot start raises an error naming its log.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
import torch

from drpo_megatron.config import RolloutConfig
from drpo_megatron.rollout.engine import generate_groups, rollout_metrics
from drpo_megatron.rollout.router import RolloutSetup, RouterError, RouterFleet, SGLangRouter
from drpo_megatron.rollout.server import ServerConfig
from drpo_megatron.rollout.verify import probe_server
from drpo_megatron.weights.sync import PausedTransport
from drpo_megatron.weights.transport import build_transport
from server_helpers import VersionedActor, versioned_rollout, generate_across_a_push, push, slow_down, wait_in_flight

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU SGLang server test")]


@pytest.fixture(scope="module")
def prompts(policy):
    from transformers import AutoTokenizer

    from drpo_megatron.models.tiny import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(policy))
    return [prompt_ids(tok, f"What is {a} + {a + 3}?") for a in range(8)]


def rollout_cfg(**kw) -> RolloutConfig:
    server = ServerConfig(startup_timeout_s=240, request_timeout_s=120)
    return RolloutConfig(num_servers=2, router="sglang-router", server=server, **kw)


@pytest.fixture(scope="module")
def rollout(policy, tmp_path_factory):
    """Two servers + a launched sglang-router, through RolloutSetup (what build_run
    uses), with a tensor transport wrapped in the pause bracket."""
    tmp = tmp_path_factory.mktemp("router")
    with versioned_rollout(rollout_cfg(), policy, tmp) as rollout:
        yield rollout


def test_groups_after_sync_carry_the_version(rollout, prompts):
    setup, front, transport, actor = rollout
    assert isinstance(front, RouterFleet)
    assert sorted(setup.router.healthy_urls()) == sorted(s.url for s in setup.servers)
    metrics = push(transport, actor, 1)
    assert metrics["perf/weight_sync_pause_s"] >= 0
    assert all(s.weight_version() == "1" for s in setup.servers)

    samples = generate_groups(front, prompts, ["x"] * len(prompts), n=2, temperature=1.0,
                              top_p=1.0, max_new_tokens=16)
    assert len(samples) == 16
    assert [s.group_id for s in samples] == [g for g in range(8) for _ in range(2)]
    assert all(s.prompt_ids == prompts[s.group_id] for s in samples)
    assert all(s.weight_version == "1" for s in samples)
    assert rollout_metrics(samples, "1")["rollout/staleness"] == 0.0
    # both workers really served (round_robin): each saw /generate requests
    for s in setup.servers:
        assert "/generate" in s.log_path.read_text(errors="replace"), s.name


def test_push_during_generation_never_mixes_versions(rollout, prompts):
    setup, front, transport, actor = rollout
    push(transport, actor, 2)
    params = {"n": 4, "temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True}
    outs = generate_across_a_push(lambda: front.generate(prompts, params), setup, front,
                                  transport, actor, 3)
    assert len(outs) == len(prompts) * 4
    for o in outs:
        meta = o["meta_info"]
        assert meta["finish_reason"]["type"] == "length", meta["finish_reason"]
        assert len(o["output_ids"]) == 200
        # SGLang records which weight version produced which token span: exactly one, the new
        assert meta["weight_version"] == "3"
        assert [seg["version"] for seg in meta["weight_versions"]] == ["3"], meta["weight_versions"]
    assert front.reissued > 0, "no request was in flight during the push"


def test_server_killed_mid_rollout(rollout, prompts):
    setup, front, transport, actor = rollout
    push(transport, actor, 4)
    victim = setup.servers[1]
    old_pid = victim.proc.pid
    out: dict = {}

    def generate():
        try:
            out["samples"] = generate_groups(front, prompts, ["x"] * len(prompts), n=4,
                                             temperature=1.0, top_p=1.0, max_new_tokens=150)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    slow_down(setup.servers, 0.05)
    th = threading.Thread(target=generate)
    try:
        th.start()
        wait_in_flight(front, th)
        os.killpg(victim.proc.pid, signal.SIGKILL)  # dies with requests in flight
        victim.proc.wait()
    finally:
        slow_down([setup.servers[0]], None)
        th.join(900)
    assert "error" not in out, out.get("error")
    samples = out["samples"]
    assert len(samples) == 32
    assert [s.group_id for s in samples] == [g for g in range(8) for _ in range(4)]
    assert all(s.prompt_ids == prompts[s.group_id] for s in samples)
    assert all(s.weight_version == "4" for s in samples)
    assert all(s.finish_reason in ("length", "stop") for s in samples)
    # restarted, re-synced, registered again
    assert any(e.startswith("restarting sglang-1") for e in front.events), front.events
    assert f"{victim.name} registered with router again" in front.events
    assert victim.proc.pid != old_pid and front.is_healthy(victim)
    assert victim.weight_version() == "4"
    assert victim.url in setup.router.healthy_urls()
    a, b = (probe_server(s, prompts[0]) for s in setup.servers)
    assert a.response_ids == b.response_ids
    assert max(abs(x - y) for x, y in zip(a.rollout_logp, b.rollout_logp)) < 1e-3


def test_external_router(rollout, prompts, policy, tmp_path, monkeypatch):
    """DRPO_ROUTER_URL: no server launched; workers discovered from a router started here and
    registered like the SLURM template does."""
    setup, _, _, _ = rollout
    router = SGLangRouter(tmp_path / "ext", startup_timeout_s=120).start()
    try:
        router.wait_up()
        for s in setup.servers:
            router.add_worker(s.url)
        monkeypatch.setenv("DRPO_ROUTER_URL", router.url)
        ext = RolloutSetup(rollout_cfg(), policy, tmp_path / "logs")
        assert ext.router.external and ext.router_url_from == "DRPO_ROUTER_URL"
        ext.start()
        ext.wait_ready()
        assert all(s.external and s.proc is None for s in ext.servers)
        assert sorted(s.url for s in ext.servers) == sorted(s.url for s in setup.servers)
        assert not (tmp_path / "logs" / "sglang-0.log").exists()  # nothing launched

        actor = VersionedActor(policy)
        transport = PausedTransport(build_transport("tensor", actor, ext.servers, tmp_path / "w"),
                                    ext.servers)
        front = ext.front(None, current_version=lambda: transport.version)
        push(transport, actor, 5)
        samples = generate_groups(front, prompts[:4], ["x"] * 4, n=2, temperature=1.0,
                                  top_p=1.0, max_new_tokens=8)
        assert len(samples) == 8 and all(s.weight_version == "5" for s in samples)
        ext.stop()  # stops nothing of somebody else's
        assert all(s.proc.poll() is None for s in setup.servers)
        assert router.proc.poll() is None
        # config field wins over the environment
        cfg_setup = RolloutSetup(rollout_cfg(router_url="http://127.0.0.1:9"), policy, tmp_path)
        assert (cfg_setup.router.url, cfg_setup.router_url_from) == \
            ("http://127.0.0.1:9", "rollout.router_url")
    finally:
        router.stop()


def test_router_start_failure_names_its_log(tmp_path):
    # 1) the port is taken: the router exits, the error names router.log
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = SGLangRouter(tmp_path, port=port, startup_timeout_s=120).start()
        try:
            with pytest.raises(RouterError, match="router.log") as e:
                r.wait_up()
                r.wait_workers(["http://127.0.0.1:9"], timeout_s=5)
            assert str(tmp_path / "router.log") in str(e.value)
        finally:
            r.stop()
    # 2) a worker that never comes up: the wait says which one, and names the log
    r = SGLangRouter(tmp_path / "b", startup_timeout_s=120).start()
    try:
        r.wait_up()
        r.add_worker("http://127.0.0.1:9")
        with pytest.raises(RouterError, match=r"workers \['http://127.0.0.1:9'\].*router.log"):
            r.wait_workers(["http://127.0.0.1:9"], timeout_s=5)
    finally:
        r.stop()


@pytest.mark.extended  # the router parts: the tests above; the loop: tests/e2e
def test_train_two_servers_behind_router(tmp_path):
    """`drpo train` with rollout.router: sglang-router, num_servers 2, the distributed transport
    and verify_sync: the step completes, both servers are probed at the pushed version, and
    close() tears down the update group, the servers and the router."""
    import json
    import subprocess
    import sys

    import yaml

    cfg = {
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
                    "weight_transport": "distributed", "weight_bucket_mb": 0.5,
                    "verify_sync": True, "num_servers": 2, "router": "sglang-router"},
        "loss": {"horizon": 8},
        "optim": {"updates_per_rollout": 1},
        "train": {"max_steps": 1, "eval_every": 0},
        "logging": {"writers": ["jsonl"]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DRPO_ROUTER_URL"}
    proc = subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config",
                           str(tmp_path / "cfg.yaml"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=1200,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in rows if m["step"] == 1)
    assert step["perf/weight_sync_pause_s"] >= 0 and step["sync/probe_max_logprob_diff"] <= 0.15
    log = (out / "logs" / "trainer.log").read_text()
    assert "router: 2 healthy workers registered" in log
    for i in range(2):
        assert f"weight sync check: sglang-{i} at version 1" in log
    assert "router stopped" in log and "sglang-1 stopped" in log
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 and {r["weight_version"] for r in rollouts} == {"0"}
