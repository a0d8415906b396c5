"""A tiny real study end to end: ``drpo study`` (the CLI, in a subprocess) runs 2 methods x 1
condition (NVFP4-emulated rollout weights) x 1 seed x 2 steps, each an ordinary ``drpo train``
run with a real SGLang server on CPU and the Megatron actor (both at once: ``--parallel 2``);
then the study page, figures and aggregates read those runs, and a second ``drpo study`` skips
both finished runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from drpo_megatron.dashboard.data import describe_config
from drpo_megatron.study.results import load_study
from drpo_megatron.study.runner import STUDY_LOG, TRAIN_OUTPUT, run_state

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
#: Two runs, each ~1-2 min of start-up (tiny checkpoint, SGLang on CPU, Megatron) on an idle
#: machine; allow for two shared, busy cores.
STUDY_TIMEOUT_S = 1800
#: The second invocation only reads files.
RERUN_TIMEOUT_S = 300


def _spec(root: Path) -> Path:
    spec = {
        "name": "tiny", "seeds": [1],
        "base": {"overrides": {
            "model": {"cache_dir": str(root / "cache"), "tiny": {"sft_steps": 60}},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12},
            "loss": {"horizon": 12},
            "optim": {"updates_per_rollout": 2},
            "train": {"max_steps": STEPS, "eval_every": 2, "eval_samples_per_prompt": 2},
            "task": {"num_eval": 8},
            "logging": {"writers": ["jsonl"]}}},
        "methods": [{"name": "drpo", "loss": {"name": "drpo", "params": {"delta": 12.5}}},
                    {"name": "ppo_clip",
                     "loss": {"name": "ppo_clip", "params": {"eps_low": 0.2, "eps_high": 0.28}}}],
        "conditions": [{"name": "nvfp4", "overrides": {"rollout": {"precision": "nvfp4_emulated"}}}],
    }
    p = root / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def _drpo_study(spec: Path, out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "study", str(spec),
                           "--out", str(out), "--parallel", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_study_end_to_end(tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "study"
    t0 = time.time()
    proc = _drpo_study(spec, out, STUDY_TIMEOUT_S)
    first_s = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2/2 runs finished (2 now, 0 before)" in proc.stdout, proc.stdout

    for meth, loss, word in (("drpo", "drpo", "drpo (δ=12.5)"),
                             ("ppo_clip", "ppo_clip", "ppo_clip (eps_low=0.2, eps_high=0.28)")):
        run = out / "runs" / "nvfp4" / meth / "seed1"
        assert run_state(run, STEPS).state == "finished"
        cfg = yaml.safe_load((run / "config.yaml").read_text())   # written by drpo train itself
        assert cfg["name"] == f"nvfp4/{meth}/seed1" and cfg["output_dir"] == str(run)
        assert cfg["loss"]["name"] == loss and cfg["train"]["seed"] == 1
        assert cfg["rollout"]["precision"] == "nvfp4_emulated"
        # the dashboard's legend reads the real resolved config
        assert describe_config(cfg) == {"name": f"nvfp4/{meth}/seed1",
                                        "model": "built-in tiny model", "loss": word,
                                        "precision": "NVFP4 rollout (emulated)"}
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "loss/policy_loss" in r]
        assert [r["step"] for r in train_rows] == [1, 2]
        for r in train_rows:
            assert math.isfinite(r["loss/policy_loss"]) and r["mismatch/logprob_abs_diff"] > 0
        assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
        assert (run / TRAIN_OUTPUT).exists()  # the trainer's stdout / stderr

    # the aggregates are the runs' own numbers (one seed: std 0)
    res = load_study(out)
    for meth in ("drpo", "ppo_clip"):
        rows = [json.loads(x) for x in
                (out / "runs" / "nvfp4" / meth / "seed1" / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r]
        cell = res.cells[("nvfp4", meth)]
        assert cell.final_reward == pytest.approx((sum(rewards) / len(rewards), 0.0, 1))
        assert cell.final_eval[0] == pytest.approx([r["eval/accuracy"] for r in rows
                                                    if "eval/accuracy" in r][-1])
        assert res.curves[("nvfp4", meth, "rollout/reward_mean")].mean == pytest.approx(rewards)
    assert (out / "study.yaml").exists() and 'data-study="tiny"' in (out / "report.html").read_text()
    summary = (out / "summary.md").read_text()  # the same cells as Markdown
    for meth in ("drpo", "ppo_clip"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {meth} | "))
        assert row.split(" | ")[1] == f"{res.cells[('nvfp4', meth)].final_reward[0]:.3g}"
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "final_reward.png", "mismatch.png", "nvfp4.png"]
    resolved = yaml.safe_load((out / "study.yaml").read_text())
    assert resolved["provenance"]["command"].startswith("drpo study ")

    # again: both runs are finished, nothing is launched
    starts = sum(json.loads(x)["event"] == "start" for x in (out / STUDY_LOG).read_text().splitlines())
    outputs = {m: (out / "runs" / "nvfp4" / m / "seed1" / TRAIN_OUTPUT).read_text()
               for m in ("drpo", "ppo_clip")}
    proc = _drpo_study(spec, out, RERUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 finished already, 0 to resume, 0 new" in proc.stderr + proc.stdout
    assert "2/2 runs finished (0 now, 2 before)" in proc.stdout
    assert sum(json.loads(x)["event"] == "start"
               for x in (out / STUDY_LOG).read_text().splitlines()) == starts
    for m, text in outputs.items():
        assert (out / "runs" / "nvfp4" / m / "seed1" / TRAIN_OUTPUT).read_text() == text
    print(f"tiny study: {first_s:.0f} s for 2 runs of {STEPS} steps")
