"""Routing replay (R3) in the real loop: `drpo train` with a real SGLang CPU server and the
Megatron actor, ``rollout.routing_replay`` off / record / replay.

The rollouts run on MXFP4-emulated weights (``rollout.precision: mxfp4_emulated``: the trainer
keeps fp32 weights), a setting where the engine's router picks other experts than the trainer's
for some tokens.  Step 1 of the three runs draws the same samples (same fresh weights, same
per-sample seeds), so their step-1 metrics are a paired comparison:

* off: no routes anywhere (no ``mismatch/moe/*``, no ``routed_experts`` in rollouts.jsonl);
* record: the samples carry the engine's routes (rollouts.jsonl), ``mismatch/moe/*`` reports a
  non-zero disagreement, overall and per layer, and nothing is forced (the step's loss and
  gradient equal off's);
* replay: the trainer's routers used the engine's experts (``mismatch/moe/*`` = 0, per layer:
  measured by the hook on Megatron's router, see training/routing_replay.py) and
  ``mismatch/logprob_abs_diff`` is below off's.

Then (with `-m extended`) kill -9 and resume with replay (the pattern of test_resume_e2e.py): run B saves at step 2,
is killed in step 3 and resumed; steps 3-4 draw the same samples, with the same routes, and give
the same losses as the uninterrupted replay run A (rel 1e-6, as the resume test).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from subprocess_util import (build_tiny_policy, drpo_train_cmd, kill_after_checkpoint, kill_tree,
                             small_run_config, step_metrics, worker_env)
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
SAMPLES_PER_STEP = 4 * 4
LAYERS, TOP_K = 2, 2  # the embedded tiny policy


def _cfg(root: Path, mode: str, *, steps: int, save_every: int = 0) -> Path:
    cfg = small_run_config(root / "cache", steps=steps, train={"save_every": save_every},
                           rollout={"precision": "mxfp4_emulated", "routing_replay": mode})
    path = root / f"cfg_{mode}_{steps}_{save_every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_cmd = drpo_train_cmd
_env = worker_env


def _rollouts(run: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for line in (run / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r)
    return {step: rows[-SAMPLES_PER_STEP:] for step, rows in out.items()}


def _sample(r: dict) -> tuple:
    return (r["prompt_ids"], r["response_ids"], r["rollout_logp"])


def _run(cmd: list[str], timeout: float = 1200) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]


def _run_all(tmp_path: Path, cmds: dict[str, list[str]], timeout: float = 1200) -> None:
    """The runs at the same time (each one server and one trainer; they share the cores)."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=open(tmp_path / f"{name}.err", "w"))
             for name, cmd in cmds.items()}
    try:
        for name, p in procs.items():
            assert p.wait(timeout=timeout) == 0, (tmp_path / f"{name}.err").read_text()[-4000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_tree(p)


def test_routing_replay_off_record_replay(tmp_path):
    """Off / record / replay: step 1 is a paired comparison (the same samples); replay keeps the
    trainer on the engine's experts at step 2 too, after a push of new weights."""
    build_tiny_policy(tmp_path / "cache")
    runs = {mode: tmp_path / mode for mode in ("off", "record", "replay")}
    _run_all(tmp_path, {"off": _cmd(_cfg(tmp_path, "off", steps=1), runs["off"]),
                        "record": _cmd(_cfg(tmp_path, "record", steps=1), runs["record"]),
                        "replay": _cmd(_cfg(tmp_path, "replay", steps=2), runs["replay"])})
    m_off, m_rec, m_a = (step_metrics(runs[k]) for k in ("off", "record", "replay"))
    r_off, r_rec, r_a = (_rollouts(runs[k]) for k in ("off", "record", "replay"))
    assert sorted(m_a) == [1, 2]
    # step 1: the same samples in all three runs (a paired comparison)
    assert [_sample(r) for r in r_off[1]] == [_sample(r) for r in r_rec[1]] == \
        [_sample(r) for r in r_a[1]]

    # off: no routes, no routing metrics
    assert not any("routed_experts" in r for r in r_off[1])
    assert not any(k.startswith("mismatch/moe/") for k in m_off[1])

    # record and replay: every sample carries the engine's routes, [prompt + response - 1, L, K]
    for rows in (r_rec[1], r_a[1]):
        for r in rows:
            re = r["routed_experts"]
            t = len(r["prompt_ids"]) + len(r["response_ids"]) - 1
            assert re["shape"] == [t, LAYERS, TOP_K] and re["dtype"] == "uint8"
            assert len(base64.b64decode(re["b64"])) == t * LAYERS * TOP_K
    assert [r["routed_experts"] for r in r_rec[1]] == [r["routed_experts"] for r in r_a[1]]

    # record: a real disagreement, overall and per layer; nothing forced
    rec = m_rec[1]
    assert rec["mismatch/moe/route_mismatch_frac"] > 0, rec
    assert rec["mismatch/moe/token_mismatch_frac"] > 0
    per_layer = [rec[f"mismatch/moe/layer_{i}/route_mismatch_frac"] for i in range(LAYERS)]
    assert max(per_layer) > 0 and max(per_layer) == rec["mismatch/moe/layer_mismatch_frac_max"]
    for key in ("loss/policy_loss", "loss/grad_norm", "mismatch/logprob_abs_diff"):
        assert rec[key] == pytest.approx(m_off[1][key], rel=1e-6, abs=1e-9), key

    # replay: the routers used the engine's experts; π is closer to µ than without replay
    rep = m_a[1]
    assert rep["mismatch/moe/route_mismatch_frac"] == 0.0
    assert rep["mismatch/moe/token_mismatch_frac"] == 0.0
    assert all(rep[f"mismatch/moe/layer_{i}/route_mismatch_frac"] == 0.0 for i in range(LAYERS))
    assert rep["mismatch/logprob_abs_diff"] < m_off[1]["mismatch/logprob_abs_diff"], (
        rep["mismatch/logprob_abs_diff"], m_off[1]["mismatch/logprob_abs_diff"])
    assert all(m_a[s]["mismatch/moe/route_mismatch_frac"] == 0.0 for s in m_a)



@pytest.mark.extended  # replay itself: the test above; resume exactness: test_resume_e2e.py
def test_routing_replay_kill_and_resume_equals_uninterrupted(tmp_path):
    """Run B (replay, saves at step 2) is killed in step 3 and resumed; every step draws the
    same samples with the same routes, and gives the same losses, as the uninterrupted run A."""
    build_tiny_policy(tmp_path / "cache")
    run_a, run_b = tmp_path / "replay_a", tmp_path / "replay_b"
    kill_after_checkpoint(_cmd(_cfg(tmp_path, "replay", steps=STEPS), run_a),
                          _cmd(_cfg(tmp_path, "replay", steps=STEPS, save_every=2), run_b), run_b,
                          tmp_path, steps=STEPS)  # B saves at step 2, is killed in step 3
    _run(_cmd(_cfg(tmp_path, "replay", steps=STEPS, save_every=2), run_b, "--resume"))
    m_a, m_b = step_metrics(run_a), step_metrics(run_b)
    r_a, r_b = _rollouts(run_a), _rollouts(run_b)
    assert all(m_a[s]["mismatch/moe/route_mismatch_frac"] == 0.0 for s in m_a)
    # kill -9 + resume with replay: identical samples (routes included) and losses
    log = (run_b / "logs" / "trainer.log").read_text()
    assert "resumed from" in log and "continuing at step 3" in log
    assert sorted(m_a) == sorted(m_b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert [(_sample(r), r["routed_experts"]) for r in r_b[step]] == \
            [(_sample(r), r["routed_experts"]) for r in r_a[step]], step
        for key in ("loss/policy_loss", "loss/grad_norm", "mismatch/logprob_abs_diff",
                    "mismatch/moe/route_mismatch_frac"):
            assert m_b[step][key] == pytest.approx(m_a[step][key], rel=1e-6, abs=1e-9), (step, key)
