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


# ---------------------------------------------------------------------------- --set, show, YAML
def test_set_overrides_any_field_with_yaml_values():
    cfg = load_config("model_configs/tiny_qwen3_moe_cpu.yaml",
                      sets=["optim.lr=1e-5", "loss.params.delta=0.5", "rollout.server.port=31000",
                            "parallel.etp=null", "logging.writers=[jsonl]", "name=x y"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.params == {"delta": 0.5} and cfg.loss.policy.delta == 0.5
    assert cfg.rollout.server.port == 31000 and cfg.parallel.etp is None
    assert cfg.logging.writers == ["jsonl"] and cfg.name == "x y"


@pytest.mark.parametrize("item,match", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; did you mean 'lr'\?"),
    ("optim.lr=fast", r"optim.lr='fast': expected a number; write e.g. lr: 0.0001"),
    ("optim.lr=.inf", r"optim.lr=inf: must be a finite number"),
    ("loss.params.delta=\"12.5\"", r"loss: .*delta = '12.5' is invalid: must be a number, not a string"),
    ("rollout.server.port=70000", r"rollout.server.port=70000 must be <= 65535"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1 must be > 0"),
    ("optim.lr", r"expected KEY=VALUE"),
    ("optim.lr.x=1", r"optim.lr=\{.x.: 1\}: expected a number"),
    ("output_dir=", r"output_dir='': empty"),
])
def test_set_errors_name_field_value_and_fix(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets=[item])


def test_set_is_validated_like_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 2e-5\n")  # YAML 1.2 float (PyYAML alone reads a string)
    assert load_config(y).optim.lr == 2e-5
    assert load_config(y, sets=["optim.lr=3e-5"]).optim.lr == 3e-5  # --set wins over the file


def test_duplicate_yaml_sections_are_refused(tmp_path):
    y = tmp_path / "dup.yaml"
    y.write_text("rollout:\n  temperature: 0.7\noptim:\n  lr: 1.0e-5\nrollout:\n  top_p: 0.9\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'rollout' \(first on line 1, again on line 5\)"):
        load_config(y)


def test_other_loss_without_params_gets_its_own_defaults():
    cfg = load_config(None, {"loss": {"name": "ppo_clip"}})
    assert cfg.loss.params == {} and cfg.loss.policy.eps_high == 0.28


def test_describe_fields_covers_every_leaf_with_docs():
    from drpo_megatron.config import describe_fields

    rows = {name: (value, default, doc) for name, value, default, doc in
            describe_fields(load_config(None, sets=["optim.lr=1e-5"]))}
    assert rows["optim.lr"][:2] == (1e-5, 1e-4)
    assert rows["rollout.server.port"][0] == 0
    undocumented = [n for n, (_, _, doc) in rows.items() if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_cli_config_show_and_set(capsys):
    from drpo_megatron.cli import main

    assert main(["config", "show", "--set", "optim.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr = 1e-05   (default: 0.0001)" in out and "Learning rate" in out
    assert main(["config", "show", "--format", "yaml", "--set", "loss.name=pg_is"]) == 0
    assert "name: pg_is" in capsys.readouterr().out
    assert main(["config", "show", "--set", "optim.nope=1"]) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err


def test_cli_train_set_error_before_anything_starts(tmp_path, capsys):
    from drpo_megatron.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "run"), "--set", "rollout.temperature=0"]) == 2
    assert "rollout.temperature=0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
