"""Authenticated engines (rollout/auth.py, rollout/launch.py; docs/operate.md, Security).

Fast: the key file (0600, one random key per run), its checks, where the key comes from, and that
no command line we build holds it.

Slow (a real SGLang server on CPU and a real sglang-router, both started with the run's key):

* weight-update calls (``/update_weights_from_disk``, ``/update_weights_from_tensor``,
  ``/init_weights_update_group``, ``/update_weight_version``, ...) and ``/generate`` without the
  key, or with a wrong one, are refused with 401 and change nothing (the weight version stays);
* the router's worker registration (``POST /workers``), listing, removal and ``/generate`` without
  the key are refused, and no worker is added;
* our own clients (the same calls the loop makes) succeed;
* the key is in no process's command line and in no log;
* every listening socket of the server and the router is on 127.0.0.1, except the one SGLang
  0.5.23 cannot restrict (its scheduler's torch TCPStore on ``--nccl-port``).
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import requests
import torch

from drpo_megatron.config import ConfigError, RolloutConfig, load_config
from drpo_megatron.rollout import launch
from drpo_megatron.rollout.auth import (API_KEY_FILE_ENV, ApiKey, ApiKeyError, create_key_file,
                                        read_key_file, router_key_args)
from drpo_megatron.rollout.router import KEY_FILE, RolloutSetup, SGLangRouter, rollout_api_key
from drpo_megatron.rollout.server import ServerConfig, SGLangServer, free_port

# ----------------------------------------------------------------------------------------- fast


def test_key_file_is_owner_only_and_random(tmp_path):
    a = create_key_file(tmp_path / "secrets" / "api_key")
    b = create_key_file(tmp_path / "secrets" / "api_key")  # a new start: a new key, same file
    assert stat.S_IMODE(a.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(a.path.parent.stat().st_mode) == 0o700
    assert a.key != b.key and len(b.key) == 43  # token_urlsafe(32)
    assert read_key_file(b.path).key == b.key
    assert b.key not in repr(b) and b.key not in str(b)
    assert b.headers() == {"Authorization": f"Bearer {b.key}"}
    assert b.env() == {API_KEY_FILE_ENV: str(b.path)}


@pytest.mark.parametrize("case,match", [
    ("missing", r"cannot read the API key file"),
    ("readable", r"can be read by other users \(mode 0644\): run `chmod 600 "),
    ("placeholder", r"must hold one API key of 16 to 512 characters"),
    ("two-keys", r"must hold one API key"),
    ("directory", r"is not a regular file"),
])
def test_bad_key_files_are_refused_naming_the_setting(tmp_path, case, match):
    p = tmp_path / "key"
    if case == "directory":
        p.mkdir()
    elif case != "missing":
        text = {"readable": "k" * 43, "placeholder": "changeme", "two-keys": "a" * 20 + "\n" + "b" * 20}
        p.write_text(text[case])
        p.chmod(0o644 if case == "readable" else 0o600)
    with pytest.raises(ApiKeyError, match=match) as e:
        read_key_file(p, "rollout.api_key_file")
    assert str(e.value).startswith(f"rollout.api_key_file={str(p)!r}")


def test_config_refuses_a_key_file_others_can_read(tmp_path):
    p = tmp_path / "key"
    p.write_text("k" * 43)
    p.chmod(0o640)
    with pytest.raises(ConfigError, match=r"rollout.api_key_file=.*mode 0640.*chmod 600"):
        load_config(None, {"rollout": {"api_key_file": str(p)}})
    p.chmod(0o600)
    assert load_config(None, {"rollout": {"api_key_file": str(p)}}).rollout.api_key_file == str(p)


def test_where_the_key_comes_from(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    monkeypatch.delenv("DRPO_ROUTER_URL", raising=False)
    # servers drpo launches: a new key in <run>/secrets/api_key at every start
    k1 = rollout_api_key(RolloutConfig(), tmp_path / "run")
    k2 = rollout_api_key(RolloutConfig(), tmp_path / "run")
    assert k1.path == k2.path == tmp_path / "run" / KEY_FILE and k1.key != k2.key
    # the environment (what the SLURM template exports) ...
    env_key = create_key_file(tmp_path / "env_key")
    monkeypatch.setenv(API_KEY_FILE_ENV, str(env_key.path))
    assert rollout_api_key(RolloutConfig(), tmp_path / "run").key == env_key.key
    # ... is overridden by rollout.api_key_file
    cfg_key = create_key_file(tmp_path / "cfg_key")
    assert rollout_api_key(RolloutConfig(api_key_file=str(cfg_key.path)),
                           tmp_path / "run").key == cfg_key.key
    # an external router and no key: none, with a warning (nothing to launch, nothing to make)
    monkeypatch.delenv(API_KEY_FILE_ENV)
    with caplog.at_level(logging.WARNING):
        assert rollout_api_key(RolloutConfig(router_url="http://10.0.0.1:30000"),
                               tmp_path / "ext") is None
    assert "external router without an API key" in caplog.text
    assert not (tmp_path / "ext").exists()


def test_no_command_line_holds_the_key(tmp_path):
    key = create_key_file(tmp_path / "k")
    s = SGLangServer("/models/m", ServerConfig(port=30001), tmp_path, api_key=key)
    r = SGLangRouter(tmp_path, port=30002, api_key=key)
    for cmd in (s.command(), r.command()):
        assert not any(key.key in a for a in cmd), cmd
        assert cmd[1:3] == ["-m", "drpo_megatron.rollout.launch"]
    assert s._session.headers["Authorization"] == f"Bearer {key.key}"
    assert r.client(ServerConfig())._session.headers["Authorization"] == f"Bearer {key.key}"
    # without a key: stock commands, nothing sent
    assert SGLangServer("/m", ServerConfig(port=1), tmp_path).command()[1:3] == [
        "-m", "sglang.launch_server"]


def test_a_key_beginning_with_a_dash_reaches_sglang_and_the_router():
    """token_urlsafe keys begin with "-" one time in 64: passed as ``--flag=KEY`` they still
    parse (SGLang's and sglang-router's own argument parsers)."""
    from sglang.srt.server_args import prepare_server_args
    from sglang_router.launch_router import parse_router_args

    key = ApiKey(Path("/k"), "-" + "a" * 42)
    assert prepare_server_args(launch.sglang_argv(["--model-path", "/m"], key)).api_key == key.key
    r = parse_router_args(["--host", "127.0.0.1", *router_key_args(key)])
    assert r.api_key == key.key
    assert r.control_plane_api_keys == [("drpo", "drpo-trainer", key.key, "admin")]


def test_launch_without_a_key_file_refuses(monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)
    assert launch.main(["sglang", "--model-path", "/m"]) == 2
    assert f"{API_KEY_FILE_ENV} is not set" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- slow


slow = pytest.mark.slow
cpu_server = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU SGLang server test")


@pytest.fixture(scope="module")
def engines(policy, tmp_path_factory):
    """A real SGLang server and a real sglang-router, started with a per-run key as drpo train
    starts them (rollout_api_key -> SGLangServer / SGLangRouter), the server registered."""
    tmp = tmp_path_factory.mktemp("auth")
    key = rollout_api_key(RolloutConfig(router_url=None), tmp / "run")
    nccl_port = free_port()
    cfg = ServerConfig(startup_timeout_s=400, request_timeout_s=120,
                       extra_args=["--nccl-port", str(nccl_port)])
    server = SGLangServer(policy, cfg, tmp / "logs", api_key=key)
    router = SGLangRouter(tmp / "logs", api_key=key, startup_timeout_s=400)
    try:
        router.start()
        server.start().wait_healthy()
        router.wait_up()
        router.add_worker(server.url)
        router.wait_workers([server.url])
        server.set_weight_version("0")
        yield key, server, router, nccl_port
    finally:
        server.stop()
        router.stop()


NO_KEY = [{}, {"Authorization": "Bearer wrong-key-of-sufficient-length"},
          {"Authorization": "Basic c2VjcmV0"}]


@slow
@cpu_server
@pytest.mark.parametrize("headers", NO_KEY, ids=["none", "wrong-bearer", "basic"])
def test_calls_without_the_key_are_refused(engines, policy, headers):
    _, server, router, _ = engines
    before = server.weight_version()
    calls = [  # what an attacker would do to a server: push weights, re-label them, stall it
        ("/update_weights_from_disk", {"model_path": str(policy), "weight_version": "666"}),
        ("/update_weights_from_tensor", {"serialized_named_tensors": [], "flush_cache": False}),
        ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 9,
                                        "rank_offset": 1, "world_size": 2, "group_name": "x",
                                        "backend": "gloo"}),
        ("/update_weight_version", {"new_version": "666"}),
        ("/pause_generation", {"mode": "abort"}),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}),
    ]
    for path, body in calls:
        r = requests.post(server.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    assert server.weight_version() == before  # nothing changed (asked with our key)
    # the router: register an attacker's worker, list, remove, generate
    wid = router.workers()[0]["id"]
    for method, path, body in [("POST", "/workers", {"url": "http://127.0.0.1:9"}),
                               ("GET", "/workers", None), ("DELETE", f"/workers/{wid}", None),
                               ("POST", "/generate", {"input_ids": [1, 2],
                                                      "sampling_params": {"max_new_tokens": 1}})]:
        r = requests.request(method, router.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
    assert [w["url"] for w in router.workers()] == [server.url]


@slow
@cpu_server
def test_our_calls_succeed(engines, policy):
    _, server, router, _ = engines
    server.update_weights_from_disk(policy, weight_version="1")  # + /flush_cache
    server.pause_generation()
    server.continue_generation()
    assert server.weight_version() == "1"
    (out,) = router.client(server.cfg).generate([[1, 2, 3]], {"max_new_tokens": 2,
                                                               "temperature": 0.0})
    assert out["meta_info"]["weight_version"] == "1"
    server.set_weight_version("0")


@slow
@cpu_server
def test_external_router_with_the_key_from_the_environment(engines, policy, tmp_path,
                                                           monkeypatch):
    """The disaggregated path: drpo train attaches to a router it did not start, with the key
    file named by DRPO_API_KEY_FILE (what the SLURM template exports), exactly as
    build_run does (rollout_api_key -> RolloutSetup)."""
    key, server, router, _ = engines
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key.path))
    monkeypatch.setenv("DRPO_ROUTER_URL", router.url)
    rcfg = RolloutConfig(num_servers=1, server=server.cfg)
    found = rollout_api_key(rcfg, tmp_path / "run")
    assert found.key == key.key and not (tmp_path / "run").exists()
    setup = RolloutSetup(rcfg, policy, tmp_path / "logs", api_key=found)
    setup.start()
    setup.wait_ready()  # lists the workers and sets weight version "0" on each: both need the key
    (worker,) = setup.servers
    assert worker.external and worker.url == server.url and worker.weight_version() == "0"
    (out,) = setup.front().generate([[1, 2, 3]], {"max_new_tokens": 2})
    assert out["meta_info"]["weight_version"] == "0"
    setup.stop()  # stops nothing of somebody else's
    assert server.proc.poll() is None and router.proc.poll() is None


@slow
@cpu_server
def test_key_in_no_command_line_and_no_log(engines, session_pids):
    key, server, router, _ = engines
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    pids = session_pids(server.proc.pid) + session_pids(router.proc.pid)
    assert len(pids) >= 2
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert key.key not in cmdline, pid
    for log in (server.log_path, router.log_path):
        text = log.read_text(errors="replace")
        assert key.key not in text, log
    assert "'api_key': '<redacted>'" in server.log_path.read_text(errors="replace")


@slow
@cpu_server
def test_listeners_are_loopback(engines, session_pids, listeners):
    _, server, router, nccl_port = engines
    ours = listeners(session_pids(server.proc.pid)) | listeners(session_pids(router.proc.pid))
    assert ("127.0.0.1", server.port) in ours and ("127.0.0.1", router.port) in ours
    wide = {(h, p) for h, p in ours if h != "127.0.0.1"}
    # SGLang 0.5.23's scheduler initialises torch.distributed with tcp://127.0.0.1:<nccl_port>;
    # torch's TCPStore listens on every interface and neither offers a bind setting
    # (docs/operate.md, Security)
    assert {p for _, p in wide} <= {nccl_port}, wide

