"""Table of bad inputs across the operate entry points (config, convert, plan, submit): each gives
exactly one error line that names the field (or option), the bad value and a fix, before any
process starts.  (tests/spine/test_config.py holds the older config cases.)"""

import json
from pathlib import Path

import pytest
import yaml

from drpo_megatron.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
FIX_WORDS = ("choose", "use", "set", "pick", "pass", "must", "lower", "raise", "run", "change",
             "make", "drop", "add", "fill", "copy", "point", "needs", "write")
QWEN3_30B = ROOT / "model_configs" / "qwen3_30b_a3b_base_bf16.yaml"
QWEN3_4B = ROOT / "model_configs" / "qwen3_4b_base_bf16.yaml"


def _config_error(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


def _yaml(tmp_path, base: Path, parallel: dict, **top) -> str:
    data = yaml.safe_load(base.read_text())
    data["parallel"].update(parallel)
    data["output_dir"] = str(tmp_path / "run")
    data.update(top)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _cli(main, argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    return err[0]


def _hf_dir(tmp_path, **cfg) -> str:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    base = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "num_experts": 4, "hidden_size": 64, "vocab_size": 128}
    base.update(cfg)
    (d / "config.json").write_text(json.dumps(base))
    return str(d)


CONFIG_CASES = [  # (overrides, field, value)
    ({"parallel": {"tp": 0}}, "parallel.tp", "0"),
    ({"parallel": {"etp": 0}}, "parallel.etp", "0"),
    ({"parallel": {"device": "gpu"}}, "parallel.device", "'gpu'"),
    ({"parallel": {"recompute": "partial"}}, "parallel.recompute", "'partial'"),
    ({"parallel": {"rollout_nodes": -1}}, "parallel.rollout_nodes", "-1"),
    ({"parallel": {"gpu_memory_gb": 0.0}}, "parallel.gpu_memory_gb", "0.0"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel", "true"),
    ({"parallel": {"tp": 3}}, "parallel.tp", "3"),
    ({"parallel": {"ep": 2}}, "parallel.ep", "2"),
    ({"model": {"fp8": "tensorwise"}}, "model.fp8", "'tensorwise'"),
    ({"model": {"fp8": "blockwise", "dtype": "fp32"}, "parallel": {"device": "cuda"}}, "model.dtype", "'fp32'"),
    ({"model": {"fp8": "blockwise", "dtype": "bf16"}}, "model.fp8", "'blockwise'"),
    ({"model": {"arch": {"hidden_size": "big"}}}, "model.arch.hidden_size", "'big'"),
    ({"task": {"kind": "math"}}, "task.train_file", "''"),
    ({"task": {"kind": "math", "train_file": "d.jsonl"}}, "task.eval_files", "[]"),
    ({"task": {"kind": "math", "train_file": "nope/d.jsonl", "eval_files": ["e.jsonl"]}},
     "task.train_file", "'nope/d.jsonl'"),
    ({"task": {"kind": "math", "train_file": "d.jsonl", "eval_files": ["e.jsonl"],
               "prompt_template": "{question}"}}, "task.prompt_template", "'{question}'"),
    ({"task": {"max_prompt_tokens": -1}}, "task.max_prompt_tokens", "-1"),
    ({"optim": {"lr_schedule": "cosine"}}, "optim.lr_schedule", "'cosine'"),
]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-specific messages")
@pytest.mark.parametrize("overrides,field,value", CONFIG_CASES, ids=[c[1] + "=" + c[2] for c in CONFIG_CASES])
def test_config(overrides, field, value):
    msg = _config_error(overrides)
    _check(msg, field, value)


def _check(msg, field, value):
    assert "\n" not in msg
    assert field in msg and value in msg, msg
    assert any(w in msg for w in FIX_WORDS), f"no fix in: {msg}"


CONVERT_CASES = [  # (argv builder, field, value)
    (lambda t: ["hf-to-mcore", "--hf", str(t / "nope"), "--out", str(t / "o")], "--hf", "nope"),
    (lambda t: ["hf-to-mcore", "--hf", str(t), "--out", str(t / "o")], "--hf", "config.json"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                "--out", str(t / "o")], "--hf", "GPT2LMHeadModel"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t), "--out", str(t / "o"), "--tp", "3"], "--tp", "3"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t), "--out", str(t / "o"), "--tp", "0"], "--tp", "0"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t), "--out", str(t / "o"), "--tp", "4"], "--tp",
     "num_key_value_heads=2"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t), "--out", str(t / "o"), "--pp", "3"], "--pp", "3"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t), "--out", str(t / "o"), "--ep", "3"], "--ep", "3"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t, num_experts=0, architectures=["Qwen3ForCausalLM"]),
                "--out", str(t / "o"), "--ep", "2"], "--ep", "2"),
    (lambda t: ["hf-to-mcore", "--hf", _hf_dir(t, architectures=["Qwen3_5MoeForCausalLM"]),
                "--out", str(t / "o")], "--hf", "Qwen3_5MoeForCausalLM"),
    (lambda t: ["mcore-to-hf", "--mcore", str(t / "nope"), "--out", str(t / "o")], "--mcore", "nope"),
    (lambda t: ["mcore-to-hf", "--mcore", str(t), "--out", str(t / "o")], "--hf-config", "hf_config"),
]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-specific messages")
@pytest.mark.parametrize("i", range(len(CONVERT_CASES)))
def test_convert(i, tmp_path, capsys):
    from drpo_megatron.convert.checkpoint import main

    build, field, value = CONVERT_CASES[i]
    msg = _cli(main, build(tmp_path), capsys)
    _check(msg, field, value)
    assert not (tmp_path / "o").exists()


PLAN_CASES = [  # (base config, parallel overrides, extra argv, field, value)
    (QWEN3_30B, {"gpus_per_node": 6, "tp": 3, "ep": 2, "etp": 1}, [], "parallel.tp", "num_attention_heads=32"),
    (QWEN3_30B, {"tp": 8, "ep": 2, "etp": 1}, [], "parallel.tp", "num_key_value_heads=4"),
    (QWEN3_4B, {"gpus_per_node": 10, "pp": 5}, [], "parallel.pp", "5"),
    (QWEN3_30B, {"gpus_per_node": 6, "tp": 1, "ep": 3, "etp": 1, "sequence_parallel": None}, [], "parallel.ep", "3"),
    (QWEN3_4B, {"ep": 2}, [], "parallel.ep", "2"),
    (QWEN3_30B, {"gpu_memory_gb": 20}, [], "parallel.gpu_memory_gb", "20"),
    (QWEN3_4B, {"micro_batch_size": 3}, [], "parallel.micro_batch_size", "3"),
    (QWEN3_4B, {"rollout_tp": 3}, [], "parallel.rollout_tp", "3"),
    (QWEN3_4B, {}, ["--nodes", "0"], "--nodes", "0"),
]


@pytest.mark.parametrize("i", range(len(PLAN_CASES)))
def test_plan(i, tmp_path, capsys):
    from drpo_megatron.operate.plan import main

    base, par, argv, field, value = PLAN_CASES[i]
    msg = _cli(main, [_yaml(tmp_path, base, par), *argv], capsys)
    _check(msg, field, value)


SUBMIT_CASES = [
    (["--nodes", "0"], "--nodes", "0"),
    (["--nodes", "1", "--rollout-nodes", "-1"], "--rollout-nodes", "-1"),
    (["--nodes", "1", "--time", "tomorrow"], "--time", "'tomorrow'"),
    (["--nodes", "1", "--signal-lead-s", "60", "--ckpt-grace-s", "600"], "--signal-lead-s", "60"),
    (["--nodes", "3"], "--nodes", "3"),  # 24 GPUs: the 128-sequence mini-batch does not split
]


@pytest.mark.parametrize("i", range(len(SUBMIT_CASES)))
def test_submit(i, tmp_path, capsys):
    from drpo_megatron.operate.submit import main

    argv, field, value = SUBMIT_CASES[i]
    msg = _cli(main, [_yaml(tmp_path, QWEN3_4B, {}), *argv, "--dry-run"], capsys)
    if field == "--nodes" and value == "3":
        field, value = "parallel.micro_batch_size", "dp*micro_batch_size=24"
    _check(msg, field, value)
    assert not (tmp_path / "run").exists()


def test_at_least_25_cases():
    assert len(CONFIG_CASES) + len(CONVERT_CASES) + len(PLAN_CASES) + len(SUBMIT_CASES) >= 25
