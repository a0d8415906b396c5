"""The study runner: finished / interrupted / new from a run's files, skip and resume, parallel
runs, refusing a changed config, and forwarding Ctrl-C as a checkpointing stop.

The trainer here is ``stub_train.py`` (drpo train's file contract, no model): these tests are
about the runner's decisions.  The real ``drpo train`` under ``drpo study`` runs in
test_study_e2e.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from drpo_megatron.dashboard.data import load_run
from drpo_megatron.study.runner import STUDY_LOG, check_existing, run_state, run_study
from drpo_megatron.study.spec import (RESOLVED_SPEC_FILE, StudySpecError, plan_runs,
                                      resolved_spec, spec_from_dict)

ROOT = Path(__file__).resolve().parents[2]
STUB = [sys.executable, str(Path(__file__).with_name("stub_train.py"))]
#: The stopped study must exit within this (two shared cores; the stub's step is 0.5 s).
STOP_TIMEOUT_S = 120


def _study(out: Path, max_steps: int = 6, save_every: int = 2, seeds=(1, 2)):
    spec = spec_from_dict({
        "name": "t", "seeds": list(seeds),
        "base": {"overrides": {"train": {"max_steps": max_steps, "save_every": save_every}}},
        "methods": [{"name": "a", "loss": {"name": "drpo"}}, {"name": "b", "loss": {"name": "pg_is"}}],
        "conditions": [{"name": "c"}]})
    out.mkdir(parents=True, exist_ok=True)
    (out / RESOLVED_SPEC_FILE).write_text(yaml.safe_dump(resolved_spec(spec)))
    return plan_runs(spec, out)


def _states(root: Path, max_steps: int = 40) -> Path:
    """trainer_state.pt files for the stub (drpo train's content: step, data cursor, order)."""
    d = root / "stub-states"
    if not d.exists():
        d.mkdir(parents=True)
        for step in range(max_steps + 1):
            torch.save({"step": step, "cursor": 0, "order": []}, d / f"step{step}.pt")
    return d


def _env(log: Path, **kw) -> dict:
    env = dict(os.environ, STUB_LOG=str(log), STUB_STATES=str(_states(log.parent)), **kw)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _ckpt(run: Path, step: int, name: str = "checkpoint") -> None:
    (run / name).mkdir(parents=True)
    (run / name / "metadata.json").write_text("{}")
    torch.save({"step": step, "cursor": 0, "order": []}, run / name / "trainer_state.pt")


def _metrics(run: Path, steps, tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps) + tail)


def test_run_state_from_the_runs_files(tmp_path):
    r = tmp_path / "r"
    assert run_state(r, 6).state == "new"                       # no directory
    r.mkdir()
    (r / "study_run.yaml").write_text("{}")
    assert run_state(r, 6).state == "new"                       # only the study's input
    _metrics(r, range(0, 5), tail='{"step": 6, "loss')          # torn last line: step 6 unread
    assert (run_state(r, 6).state, run_state(r, 6).last_step) == ("interrupted", 4)
    _metrics(r, range(0, 7))
    st = run_state(r, 6)                                        # logged step 6, no checkpoint
    assert (st.state, st.last_step, st.checkpoint_step) == ("interrupted", 6, None)
    _ckpt(r, 4)                                                 # killed between step 6 and its save
    assert (run_state(r, 6).state, run_state(r, 6).checkpoint_step) == ("interrupted", 4)
    import shutil

    shutil.rmtree(r / "checkpoint")
    _ckpt(r, 6, "checkpoint.old")                               # killed between the two renames
    assert run_state(r, 6).state == "finished"                  # drpo train would resume from it
    assert run_state(r, 8).state == "interrupted"               # a longer run is not finished


def test_skip_finished_resume_interrupted(tmp_path):
    out, log = tmp_path / "study", tmp_path / "invocations.jsonl"
    runs = _study(out)
    # 1. one run crashes after logging step 5 (its last checkpoint: step 4)
    res = run_study(runs, out, train_command=STUB, env=_env(log, STUB_CRASH="c/b/seed1:5"),
                    stream=io.StringIO())
    assert sorted(res.completed) == ["c/a/seed1", "c/a/seed2", "c/b/seed2"]
    assert res.failed == [("c/b/seed1", 3)] and not res.ok
    crashed = out / "runs" / "c" / "b" / "seed1"
    st = run_state(crashed, 6)
    assert (st.state, st.last_step, st.checkpoint_step) == ("interrupted", 5, 4)
    assert [(x["run"], x["start"]) for x in _rows(log)] == [
        ("c/a/seed1", 1), ("c/a/seed2", 1), ("c/b/seed1", 1), ("c/b/seed2", 1)]
    # each run got its own resolved config and its output file
    cfg = yaml.safe_load((crashed / "study_run.yaml").read_text())
    assert cfg["output_dir"] == str(crashed) and cfg["loss"]["name"] == "pg_is"
    assert "==== drpo study" in (crashed / "logs" / "drpo_train.out").read_text()

    # 2. again: the three finished runs are skipped, the crashed one resumes after step 4
    log.unlink()
    text = io.StringIO()
    res = run_study(runs, out, train_command=STUB, env=_env(log), stream=text)
    assert sorted(res.skipped) == ["c/a/seed1", "c/a/seed2", "c/b/seed2"]
    assert res.completed == ["c/b/seed1"] and res.ok
    assert _rows(log) == [{"run": "c/b/seed1", "start": 5}]
    assert run_state(crashed, 6).state == "finished"
    assert load_run(crashed).series("rollout/reward_mean")[0] == [1, 2, 3, 4, 5, 6]
    assert "3 finished already, 1 to resume, 0 new" in text.getvalue()
    assert "[4/4] c/b/seed1 finished" in text.getvalue() and "ETA" in text.getvalue()

    # 3. and again: nothing to do
    log.unlink()
    res = run_study(runs, out, train_command=STUB, env=_env(log), stream=io.StringIO())
    assert len(res.skipped) == 4 and not res.completed and not log.exists()
    events = _rows(out / STUDY_LOG)
    assert [e["event"] for e in events].count("start") == 5
    assert {e["state"] for e in events if e["event"] == "end"} == {"finished", "interrupted"}


def test_changed_config_is_refused(tmp_path):
    out, log = tmp_path / "study", tmp_path / "inv.jsonl"
    run_study(_study(out, seeds=(1,)), out, train_command=STUB, env=_env(log),
              stream=io.StringIO())
    with pytest.raises(StudySpecError, match=r"run c/a/seed1: .* different config "
                                             r"\(train.max_steps: 6 -> 8\).*new --out"):
        check_existing(_study(out, max_steps=8, seeds=(1,)))
    check_existing(_study(out, seeds=(1,)))  # the same spec: fine


def test_parallel_runs_overlap(tmp_path):
    out, log = tmp_path / "study", tmp_path / "inv.jsonl"
    runs = _study(out, max_steps=4, seeds=(1,))
    t0 = time.time()
    res = run_study(runs, out, parallel=2, train_command=STUB, env=_env(log, STUB_STEP_S="0.5"),
                    stream=io.StringIO())
    assert sorted(res.completed) == ["c/a/seed1", "c/b/seed1"]
    starts = [e["time"] for e in _rows(out / STUDY_LOG) if e["event"] == "start"]
    ends = [e["time"] for e in _rows(out / STUDY_LOG) if e["event"] == "end"]
    assert max(starts) < min(ends), "the two runs did not run at the same time"
    assert time.time() - t0 < 2 * 4 * 0.5 + 60


_STOP_SCRIPT = """
import io, json, sys
sys.path.insert(0, {tests!r})
from test_runner import _study, STUB
from drpo_megatron.study.runner import run_study
from pathlib import Path
out = Path({out!r})
res = run_study(_study(out, max_steps=40, seeds=(1,)), out, train_command=STUB)
print("RESULT " + json.dumps({{"stopped": res.stopped, "completed": res.completed,
                              "failed": res.failed}}), flush=True)
"""


def test_ctrl_c_checkpoints_and_resumes(tmp_path):
    """SIGINT to the study: the running trainer gets SIGTERM, checkpoints after its step and
    exits 75; the study stops launching, reports the runs as stopped and exits; the next
    invocation resumes after the checkpoint."""
    out, log = tmp_path / "study", tmp_path / "inv.jsonl"
    code = _STOP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(log, STUB_STEP_S="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + STOP_TIMEOUT_S
        metrics = out / "runs" / "c" / "a" / "seed1" / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert metrics.exists(), "the first run never started"
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads(text.split("RESULT ", 1)[1])
    assert result["stopped"] == ["c/a/seed1", "c/b/seed1"] and not result["completed"], text
    assert "asking running trainers to checkpoint" in text
    st = run_state(out / "runs" / "c" / "a" / "seed1", 40)
    assert st.state == "interrupted" and st.checkpoint_step == st.last_step < 40
    assert _rows(log) == [{"run": "c/a/seed1", "start": 1}]  # c/b/seed1 was never launched
    res = run_study(_study(out, max_steps=40, seeds=(1,)), out, train_command=STUB,
                    env=_env(log), stream=io.StringIO())
    assert sorted(res.completed) == ["c/a/seed1", "c/b/seed1"]
    assert _rows(log)[1] == {"run": "c/a/seed1", "start": st.checkpoint_step + 1}
