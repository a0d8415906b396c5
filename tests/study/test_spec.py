"""The study spec: merge order of each run's config, validation before anything runs, and the
shipped default study."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drpo_megatron.algorithms import make_loss_config
from drpo_megatron.study.spec import (StudySpecError, load_spec, plan_runs, resolved_spec,
                                      spec_from_dict)

ROOT = Path(__file__).resolve().parents[2]
PAPER_CLAIMS = ROOT / "model_configs" / "studies" / "paper_claims.yaml"


def _spec(**kw):
    d = {"name": "s", "seeds": [1, 2],
         "base": {"overrides": {"train": {"max_steps": 7}, "optim": {"lr": 3e-4}}},
         "methods": [{"name": "drpo", "loss": {"name": "drpo", "params": {"delta": 0.5}}},
                     {"name": "pg_is", "loss": {"name": "pg_is"},
                      "overrides": {"optim": {"grad_clip": 0.5}}}],
         "conditions": [{"name": "bf16"},
                        {"name": "fp4", "overrides": {"rollout": {"precision": "nvfp4_emulated"},
                                                      "optim": {"lr": 1e-4}}}]}
    d.update(kw)
    return d


def test_plan_merges_base_condition_method_identity(tmp_path):
    runs = plan_runs(spec_from_dict(_spec()), tmp_path)
    assert [r.run_id for r in runs] == [
        "bf16/drpo/seed1", "bf16/drpo/seed2", "bf16/pg_is/seed1", "bf16/pg_is/seed2",
        "fp4/drpo/seed1", "fp4/drpo/seed2", "fp4/pg_is/seed1", "fp4/pg_is/seed2"]
    by = {r.run_id: r for r in runs}
    r = by["fp4/pg_is/seed2"]
    c = r.config
    assert r.run_dir == tmp_path.resolve() / "runs" / "fp4" / "pg_is" / "seed2"
    assert c["output_dir"] == str(r.run_dir) and c["name"] == "fp4/pg_is/seed2"
    assert c["train"]["seed"] == 2 and c["train"]["max_steps"] == 7 == r.max_steps  # base
    assert c["optim"]["lr"] == 1e-4                 # the condition overrides the base
    assert c["rollout"]["precision"] == "nvfp4_emulated"
    assert c["optim"]["grad_clip"] == 0.5           # the method's own overrides
    # the method's loss replaces the default's (whose params {delta: 12.5} pg_is would reject)
    assert c["loss"]["name"] == "pg_is" and c["loss"]["params"] == {}
    assert by["bf16/drpo/seed1"].config["loss"]["params"] == {"delta": 0.5}
    assert by["bf16/drpo/seed1"].config["optim"]["lr"] == 3e-4
    assert by["bf16/drpo/seed1"].config["optim"]["grad_clip"] == 1.0  # default, not pg_is's
    # resolved: every field present (what drpo train writes to config.yaml)
    assert set(c) >= {"model", "task", "rollout", "loss", "optim", "train", "logging", "parallel"}


def test_base_config_file_relative_to_the_spec(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text(yaml.safe_dump(
        {"rollout": {"max_new_tokens": 12}, "loss": {"horizon": 12}}))
    spec_path = tmp_path / "cfg" / "study.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(base={"config": "base.yaml",
                                                     "overrides": {"train": {"max_steps": 3}}})))
    spec, spec_dir = load_spec(spec_path)
    runs = plan_runs(spec, tmp_path / "out", spec_dir)
    assert runs[0].config["rollout"]["max_new_tokens"] == 12 and runs[0].max_steps == 3
    # the resolved spec inlines the base config: planning from it gives the same runs
    again = plan_runs(spec_from_dict(resolved_spec(spec, spec_dir, commit="abc")), tmp_path / "out")
    assert [r.config for r in again] == [r.config for r in runs]


@pytest.mark.parametrize("change,match", [
    ({"methods": [{"name": "d", "loss": {"name": "drpo", "params": {"delta": -1}}}]},
     r"run bf16/d/seed1 .*DRPOConfig.delta = -1"),
    ({"methods": [{"name": "d", "loss": {"name": "dpro"}}]}, r"did you mean 'drpo'"),
    ({"conditions": [{"name": "x", "overrides": {"rollout": {"precision": "fp4"}}}]},
     r"run x/drpo/seed1 .*rollout.precision='fp4': choose one of .*'nvfp4_emulated'"),
    ({"conditions": [{"name": "x", "overrides": {"rollout": {"nope": 1}}}]},
     r"unknown config key 'rollout.nope'"),
    ({"methods": [{"name": "a/b", "loss": {"name": "drpo"}}]}, r"methods.0.name: name 'a/b'"),
    ({"methods": [{"name": "d", "loss": {"params": {}}}]}, r"methods.0.loss: loss needs a name"),
    ({"seeds": [1, 1]}, r"seeds: duplicate \[1\]"),
    ({"seeds": []}, r"seeds: List should have at least 1 item"),
    ({"conditions": [{"name": "c"}, {"name": "c"}]}, r"conditions: duplicate \['c'\]"),
    ({"analysis": {"collapse": {"reward_drop": 1.5}}}, r"analysis.collapse.reward_drop"),
    ({"methodz": []}, r"methodz: Extra inputs are not permitted"),
    ({"base": {"config": "missing.yaml"}}, r"base.config 'missing.yaml': file not found"),
])
def test_bad_spec_fails_before_anything_runs(tmp_path, change, match):
    with pytest.raises(StudySpecError, match=match):
        plan_runs(spec_from_dict(_spec(**change)), tmp_path, tmp_path)
    assert not (tmp_path / "runs").exists()


def test_bad_spec_file(tmp_path):
    with pytest.raises(StudySpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("- 1\n")
    with pytest.raises(StudySpecError, match="top level must be a mapping"):
        load_spec(tmp_path / "a.yaml")


def test_paper_claims_spec(tmp_path):
    """The shipped default study: the issue's methods with their params, four conditions,
    three seeds; every run config valid."""
    spec, spec_dir = load_spec(PAPER_CLAIMS)
    runs = plan_runs(spec, tmp_path, spec_dir)
    assert len(spec.seeds) >= 3 and len(runs) == 8 * 4 * len(spec.seeds)
    losses = {m.name: (m.loss["name"], m.loss.get("params", {})) for m in spec.methods}
    assert losses == {
        "pg_is": ("pg_is", {}), "ppo_clip": ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.28}),
        "spo": ("spo", {"epsilon": 12.5}), "cispo": ("cispo", {}),
        "dppo_tv": ("dppo_tv", {"delta": 0.15}), "dppo_kl": ("dppo_kl", {"delta": 0.05}),
        "drpo": ("drpo", {"delta": 12.5}), "drpo_small_delta": ("drpo", {"delta": 0.15})}
    for name, params in losses.values():
        make_loss_config(name, params)  # the registry accepts each
    conds = {r.condition: r.config for r in runs}
    assert conds["bf16"]["rollout"]["precision"] == "bf16"
    assert conds["fp8"]["rollout"]["precision"] == "fp8_emulated"
    assert conds["mxfp4"]["rollout"]["precision"] == "mxfp4_emulated"
    assert conds["stale8"]["optim"]["updates_per_rollout"] > conds["bf16"]["optim"]["updates_per_rollout"]
    # the same tuning budget: no method carries config of its own beyond its loss
    assert all(not m.overrides for m in spec.methods)
    assert len({r.config["optim"]["lr"] for r in runs}) == 1
