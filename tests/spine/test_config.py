"""Bad config values give one-line errors naming the field, the value and the fix."""

import pytest

from drpo_megatron.config import ConfigError, RunConfig, load_config


def test_defaults_and_embedded_yaml_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and cfg.loss.name == "drpo"
    assert cfg.loss.params["delta"] == 12.5
    cfg2 = load_config("model_configs/tiny_qwen3_moe_cpu.yaml", {"train": {"max_steps": 3}})
    assert cfg2.train.max_steps == 3 and cfg2.rollout.samples_per_prompt == 8


@pytest.mark.parametrize("overrides,match", [
    ({"rollout": {"samplez": 3}}, r"unknown config key 'rollout.samplez'"),
    ({"bogus": 1}, r"unknown config key 'bogus'"),
    ({"rollout": {"temperature": "hot"}}, r"rollout.temperature='hot': expected a number"),
    ({"rollout": {"temperature": 0.0}}, r"rollout.temperature=0.0 must be > 0"),
    ({"rollout": {"samples_per_prompt": 1}}, r"samples_per_prompt=1 must be >= 2"),
    ({"rollout": {"top_p": 1.5}}, r"rollout.top_p=1.5"),
    ({"train": {"max_steps": 0}}, r"train.max_steps=0 must be > 0"),
    ({"train": {"max_steps": 2.5}}, r"train.max_steps=2.5: expected an integer"),
    ({"optim": {"updates_per_rollout": 3}}, r"updates_per_rollout=3 must divide"),
    ({"model": {"dtype": "fp8"}}, r"model.dtype='fp8'"),
    ({"model": {"hf_path": "/nonexistent/ckpt"}}, r"model.hf_path='/nonexistent/ckpt': directory not found"),
    ({"task": {"kind": "gsm8k"}}, r"task.kind='gsm8k'"),
    ({"loss": {"horizon": 4}}, r"loss.horizon=4 is below rollout.max_new_tokens=16"),
    ({"rollout": {"server": {"startup_timeout_s": "x"}}}, r"rollout.server.startup_timeout_s='x'"),
    ({"rollout": []}, r"rollout: expected a mapping"),
    ({"loss": {"name": "ppo"}}, r"loss: .*ppo"),
    ({"loss": {"params": {"delta": -1.0}}}, r"loss: .*delta"),
    ({"loss": {"params": {"deltta": 1.0}}}, r"loss: .*deltta"),
    ({"loss": {"aggregation": "mean"}}, r"loss.aggregation='mean'"),
    ({"loss": {"advantage": "ppo"}}, r"loss.advantage='ppo'"),
    ({"rollout": {"weight_transport": "ftp"}}, r"rollout.weight_transport='ftp'"),
    ({"rollout": {"precision": "int4"}}, r"rollout.precision='int4'"),
    ({"logging": {"writers": ["jsonl", "csv"]}}, r"logging.writers\[1\]='csv': choose one of"),
    ({"task": {"num_train": 500}}, r"task.num_train \+ task.num_eval = 540 exceeds the 200"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only error")
def test_real_fp8_rollout_on_cpu_points_to_emulation():
    with pytest.raises(ConfigError, match="use 'fp8_emulated'"):
        load_config(None, {"rollout": {"precision": "fp8"}})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_cli_reports_config_error_before_starting_anything(tmp_path, capsys):
    from drpo_megatron.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("loss: {horizon: 1}\n")
    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "loss.horizon=1" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("model_configs/*.yaml")))
def test_shipped_model_configs_validate(path):
    assert load_config(path).train.max_steps > 0
