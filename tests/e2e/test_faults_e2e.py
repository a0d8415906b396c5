"""Faults, end to end with the real loop (SGLang CPU server, Megatron actor): each one recovers
with nothing lost, or stops clearly with the last checkpoint intact.

* a killed SGLang server (the default single-server run) is restarted, re-synced and the step
  goes on;
* a killed trainer takes its servers with it (no orphan keeps a core and a port), and a resume
  records every step once in metrics.jsonl and rollouts.jsonl;
* SIGTERM during start-up stops at once (exit 75) with nothing left running;
* a checkpoint directory that becomes unwritable stops the run with exit 1, a one-line message
  and the previous checkpoint intact;
* a loss that goes non-finite never reaches the weights and stops the run clearly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from subprocess_util import ROOT, server_processes, small_run_config, worker_env

from drpo_megatron.training.checkpoint import find_checkpoint, read_trainer_state

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


def _cfg(root: Path, cache: Path, steps: int, **train) -> Path:
    cfg = small_run_config(cache, steps=steps, train=train)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.console.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(cfg),
                             "--output-dir", str(out), *extra], cwd=ROOT, env=worker_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def _console(out: Path) -> str:
    return (out.parent / f"{out.name}.console.log").read_text(errors="replace")


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) while waiting for {what}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def _steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


def test_single_server_killed_mid_run_is_restarted(tmp_path, cache):
    out = tmp_path / "run"
    proc = _start(_cfg(tmp_path, cache, steps=4), out)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and len(_steps(out / "metrics.jsonl")) >= 1,
                  RUN_TIMEOUT_S, "step 1", proc)
        victims = [p for p in server_processes(cache)  # the server itself, not its tether
                   if any(w in " ".join(p.cmdline()) for w in ("launch_server", "rollout.launch sglang"))]
        assert victims, "no SGLang server found"
        for v in victims:
            v.kill()  # SIGKILL the server itself (its tether then exits with it)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, _console(out)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (out / "logs" / "trainer.log").read_text()
    assert "restarting sglang-0" in log, log[-3000:]
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    assert not server_processes(cache)


@pytest.mark.extended  # the default suite checks the same in tests/e2e/test_async_e2e.py (kill -9)
def test_killed_trainer_leaves_no_server_and_resume_records_each_step_once(tmp_path, cache):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, cache, steps=5, save_every=2)
    proc = _start(cfg, out)
    _wait_for(lambda: find_checkpoint(out / "checkpoint") is not None
              and len(_steps(out / "metrics.jsonl")) >= 3, RUN_TIMEOUT_S, "step 3", proc)
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait(timeout=60)
    _wait_for(lambda: not server_processes(cache), 30, "the orphaned servers to go")
    resumed = subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(cfg),
                              "--output-dir", str(out), "--resume"], cwd=ROOT, env=worker_env(),
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert _steps(out / "rollouts.jsonl") == [s for s in range(1, 6) for _ in range(16)]
    assert not server_processes(cache)


def test_sigterm_during_startup_stops_at_once(tmp_path, cache):
    out = tmp_path / "run"
    proc = _start(_cfg(tmp_path, cache, steps=3), out)
    try:
        _wait_for(lambda: (out / "logs" / "sglang-0.log").exists(), RUN_TIMEOUT_S,
                  "the server to start", proc)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, _console(out)[-3000:]
        assert time.time() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "during start-up" in _console(out)
    assert "Traceback" not in _console(out)
    _wait_for(lambda: not server_processes(cache), 30, "the servers to stop")


def test_unwritable_checkpoint_directory_stops_clearly_with_the_last_checkpoint_intact(tmp_path, cache):
    if subprocess.run(["chattr", "-V"], capture_output=True).returncode not in (0, 1):
        pytest.skip("chattr not available")
    out = tmp_path / "run"
    proc = _start(_cfg(tmp_path, cache, steps=4, save_every=1), out)
    frozen = False
    try:
        _wait_for(lambda: find_checkpoint(out / "checkpoint") is not None, RUN_TIMEOUT_S,
                  "the first checkpoint", proc)
        # immutable even for root: no new entry (checkpoint.tmp) can be made in the run directory
        frozen = subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode == 0
        if not frozen:
            proc.kill()
            pytest.skip("this file system does not support the immutable attribute")
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if frozen:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        if proc.poll() is None:
            proc.kill()
    console = _console(out)
    assert rc == 1, console[-3000:]
    assert "Traceback" not in console
    assert "drpo train: could not write the checkpoint of step" in console
    kept = find_checkpoint(out / "checkpoint")
    assert kept is not None and read_trainer_state(kept)["step"] >= 1
    assert not (out / "checkpoint.tmp").exists()


def test_non_finite_loss_stops_clearly(tmp_path, cache):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, cache, steps=4, max_nonfinite_updates=1)
    proc = subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(cfg),
                           "--output-dir", str(out), "--set", "loss.params.delta=1e-45"],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    assert "non-finite loss or gradient" in text and "train.max_nonfinite_updates=1" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss/nonfinite_skipped"] >= 1 for r in rows)
    assert not server_processes(cache)
