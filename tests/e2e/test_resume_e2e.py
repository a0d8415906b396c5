"""Kill -9 and resume: the real loop (SGLang CPU server, Megatron actor) gives the same per-step
losses as an uninterrupted run.

Run A: 6 steps.  Run B: the same config with ``train.save_every: 3``, killed with SIGKILL (trainer
and its SGLang server) once the step-3 checkpoint exists (step 4 is in flight), then restarted
with ``drpo train --resume``: it loads model, optimizer, RNG states and the data cursor, pushes the
step-3 weights to a fresh server and runs steps 4-6.

What is compared: every step's loss, gradient norm and mismatch, and every sample.

* steps 1-3: A and B are two fresh servers with the same per-sample ``sampling_seed`` s.
* steps 4-6: B's server is a *new* process with no history, loaded with the step-3 weights the
  trainer restored.  A sample depends only on its seed and the weights (SGLang's seeded sampler;
  on CPU enabled by drpo_megatron/platform/sglang_cpu.py, without which SGLang ignored the seeds
  and sampled from its global RNG, so the resumed server drew different samples), and the
  trainer restores model, optimizer, RNG states and data cursor exactly.

Tolerance: the samples and µ must be bit-identical; the losses rel 1e-6 (measured: identical).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from subprocess_util import (build_tiny_policy, drpo_train_cmd, kill_after_checkpoint, small_run_config,
                             step_metrics, worker_env)
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
SAMPLES_PER_STEP = 4 * 4  # rollout.prompts_per_step x samples_per_prompt below


def _cfg(root: Path, save_every: int) -> Path:
    cfg = small_run_config(root / "cache", steps=STEPS, train={"save_every": save_every})
    path = root / f"cfg_{save_every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_cmd = drpo_train_cmd
_env = worker_env


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    build_tiny_policy(tmp_path / "cache")  # once: both runs share the cache
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    kill_after_checkpoint(_cmd(_cfg(tmp_path, 0), run_a), _cmd(_cfg(tmp_path, 3), run_b), run_b,
                          tmp_path, steps=STEPS)  # B saves at step 3, is killed in step 4
    proc = subprocess.run(_cmd(_cfg(tmp_path, 3), run_b, "--resume"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (run_b / "logs" / "trainer.log").read_text()
    assert "resumed from" in log and "continuing at step 4" in log
    la, lb = step_metrics(run_a), step_metrics(run_b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    ra, rb = _rollouts(run_a), _rollouts(run_b)
    # samples of one prompt differ (per-sample seeds)
    groups = {}
    for r in (r for rows in ra.values() for r in rows):
        groups.setdefault((r["step"], r["group_id"]), set()).add(tuple(r["response_ids"]))
    assert sum(len(v) > 1 for v in groups.values()) >= len(groups) // 2
    # before the kill: identical
    for step in (1, 2, 3):
        for key in ("loss/policy_loss", "loss/grad_norm", "mismatch/logprob_abs_diff"):
            assert lb[step][key] == pytest.approx(la[step][key], rel=1e-6, abs=1e-9), (step, key)
    # after resume: the same samples (seeds + restored weights) and the same losses
    assert {r["weight_version"] for r in rb[4]} == {"3"}
    for step in (4, 5, 6):
        assert [(r["prompt_ids"], r["response_ids"], r["rollout_logp"]) for r in rb[step]] == \
            [(r["prompt_ids"], r["response_ids"], r["rollout_logp"]) for r in ra[step]], step
        for key in ("loss/policy_loss", "loss/grad_norm", "mismatch/logprob_abs_diff"):
            assert lb[step][key] == pytest.approx(la[step][key], rel=1e-6, abs=1e-9), (step, key)


def _rollouts(run: Path) -> dict[int, list[dict]]:
    """The last recorded rollouts of each step (a run killed after recording step 4 and resumed
    records step 4 twice: the resumed run's rows come last)."""
    out: dict[int, list[dict]] = {}
    for line in (run / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r)
    return {step: rows[-SAMPLES_PER_STEP:] for step, rows in out.items()}
