"""Checkpoint + resume: seeds, the trainer's resume logic, the actor's checkpoint round trip.

Fast tests use stand-ins for the actor / transport; the slow one runs the real MegatronActor
(1 step, save with trainer state, 2 steps vs a fresh actor that loads the checkpoint and runs the
same 2 steps: bit-identical losses, grad norms and RNG streams on CPU).  The kill -9 test of the
whole loop (real SGLang) is tests/e2e/test_resume_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from subprocess_util import run_python

from drpo_megatron.config import ConfigError, RunConfig, load_config
from drpo_megatron.data.prompts import PromptStream
from drpo_megatron.rollout.async_rollout import BatchSource
from drpo_megatron.rollout.engine import sampling_seed
from drpo_megatron.trainer import resume

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_seeds_distinct_and_stable():
    seeds = {sampling_seed(1234, s, g, k) for s in range(1, 20) for g in range(8) for k in range(8)}
    assert len(seeds) == 19 * 8 * 8
    assert all(0 <= x < 2**31 for x in seeds)
    assert sampling_seed(1234, 3, 1, 2) == sampling_seed(1234, 3, 1, 2)
    assert sampling_seed(1234, 3, 1, 2) != sampling_seed(1235, 3, 1, 2)


def test_config_fields_validated():
    cfg = load_config(None, {"train": {"save_every": 2, "resume": "must"}})
    assert cfg.train.save_every == 2 and cfg.train.resume == "must"
    with pytest.raises(ConfigError, match="save_every"):
        load_config(None, {"train": {"save_every": -1}})
    with pytest.raises(ConfigError, match="resume"):
        load_config(None, {"train": {"resume": "yes"}})


class _Actor:
    def __init__(self):
        self.loaded = None

    def load_checkpoint(self, path):
        self.loaded = path
        return 3, {"cursor": 12, "order": [2, 0, 1]}


class _Transport:
    def __init__(self):
        self.pushed = []
        self.verified = []

    def push(self, version):
        self.pushed.append(version)
        return {}

    def verify(self, version):
        self.verified.append(version)
        return {}


def _not_generated(step):
    raise AssertionError(f"resume must not generate (asked for step {step})")


def _run(run_dir, mode="auto"):
    cfg = RunConfig()
    cfg.train.resume = mode
    prompts = PromptStream([object()], tokenizer=None, seed=0)
    batches = BatchSource(_not_generated, cursor_state=prompts.state_dict)  # the sync driver's
    return SimpleNamespace(cfg=cfg, run_dir=run_dir, actor=_Actor(), sync=_Transport(),
                           prompts=prompts, batches=batches, driver=True)


def test_resume_modes(tmp_path):
    r = _run(tmp_path)
    assert resume(r) == 1 and r.actor.loaded is None  # nothing to resume
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume(_run(tmp_path, "must"))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "metadata.json").write_text("{}")
    r = _run(tmp_path, "never")
    assert resume(r) == 1 and r.actor.loaded is None
    r = _run(tmp_path)
    assert resume(r) == 4
    assert r.prompts.cursor == 12 and r.prompts.order == [2, 0, 1]
    assert r.batches.restored == {}  # a checkpoint without pending batches
    assert r.batches.state_dict() == {"cursor": 12, "order": [2, 0, 1], "pending_batches": []}
    assert r.sync.pushed == [3]  # the loaded weights reach the server before step 4
    assert r.sync.verified == [3]  # ... and are checked there (rollout.verify_sync off)


def test_resume_rolls_the_run_logs_back_to_the_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "metadata.json").write_text("{}")  # the checkpoint of step 3
    lines = [json.dumps({"step": s, "x": s}) for s in range(0, 6)]  # steps 4, 5 ran after it
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "x"')  # torn line
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                     for s in (1, 1, 2, 3, 4, 4)))
    assert resume(_run(tmp_path)) == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    steps = [json.loads(x)["step"] for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 3]


def test_resume_uses_old_copy_of_interrupted_save(tmp_path):
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "metadata.json").write_text("{}")
    (tmp_path / "checkpoint.tmp").mkdir()  # incomplete: ignored
    r = _run(tmp_path)
    assert resume(r) == 4
    assert Path(r.actor.loaded).name == "checkpoint.old"


@pytest.mark.slow
def test_actor_checkpoint_resume_is_exact(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("sized for the CPU path")
    for args in ([ROOT / "tests/platform/megatron_dist_worker.py", "make-hf", tmp_path / "hf"],
                 [ROOT / "tests/parallel/actor_parallel_worker.py", "resume", tmp_path / "hf",
                  tmp_path / "out.json"]):
        run_python(args, timeout=400)
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["step"] == 1 and res["extra"] == {"cursor": 5, "order": [3, 1, 2], "step": 1}
    assert res["rng_equal"]
    assert {"metadata.json", "trainer_state.pt", "rng_rank0.pt"} <= set(res["files"])
    assert res["resumed"] == res["continued"]  # same process kind, same order: bit-identical
