"""Bad input, tried as a new user would, through the real command line (a subprocess each).

Every case must: exit with the documented code (2 = bad input, 1 = a run-time failure), print
one ``drpo <command>: ...`` message naming the field (or option / file) and the bad value, print
no Python traceback, and start nothing expensive (no SGLang server log, no Megatron actor, and
for config errors not even the run directory).  The cases are grouped by what used to happen to
them: silently accepted, hanging, a traceback, or user data lost.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from subprocess_util import ROOT, worker_env

from drpo_megatron.dist import free_port

pytestmark = pytest.mark.slow  # ~4 s each: a subprocess that imports torch

TIMEOUT_S = 120  # a config error takes seconds; anything near this is a hang


def drpo(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drpo_megatron.cli", *args], cwd=cwd,
                          env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def check(proc: subprocess.CompletedProcess, code: int, *needles: str, run_dir: Path | None = None,
          created: bool = False) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    msg = [ln for ln in proc.stderr.splitlines() if ln.startswith("drpo ")]
    assert msg, out[-3000:]
    text = proc.stderr[proc.stderr.index(msg[0]):]
    for n in needles:
        assert n in text, (n, text)
    assert "actor ready" not in out and "waiting for sglang" not in out, out[-3000:]
    if run_dir is not None:
        if created:
            assert not (run_dir / "logs" / "sglang-0.log").exists()
        else:
            assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    return text


def train(tmp_path: Path, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["train", "--output-dir", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    return drpo(*args, *extra)


# ----------------------------------------------------------------- silently accepted before
ACCEPTED = [
    ("optim.lr=.inf", "optim.lr=inf", "finite"),
    ("optim.lr=-1e-5", "optim.lr=-1e-05", "must be >"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1", "must be >"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1", "must be >="),
    ("optim.adam_beta2=1.5", "optim.adam_beta2=1.5", "must be <"),
    ('loss.params.delta="12.5"', "delta = '12.5'", "not a string"),
    ("loss.params.delta=.nan", "delta", "finite"),
    ("rollout.verify_sync_atol=.nan", "rollout.verify_sync_atol=nan", "finite"),
    ("rollout.temperature=.nan", "rollout.temperature=nan", "finite"),
    ("rollout.top_p=0", "rollout.top_p=0", "must be >"),
    ("rollout.oversample_factor=0.5", "rollout.oversample_factor=0.5", "must be >="),
    ("train.eval_samples_per_prompt=0", "train.eval_samples_per_prompt=0", "must be >"),
    ("task.num_eval=0", "task.num_eval=0", "must be >="),
    ("task.num_train=0", "task.num_train=0", "must be >="),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size=0", "must be >="),
    ("model.tiny.sft_label_noise=2", "model.tiny.sft_label_noise=2", "must be <="),
    ("model.arch.hidden_size=-47", "model.arch.hidden_size=-47", "must be >="),
    ("parallel.micro_batch_size=0", "parallel.micro_batch_size=0", "must be >="),
    ("rollout.weight_bucket_mb=0", "rollout.weight_bucket_mb=0", "must be >"),
    ("rollout.server.startup_timeout_s=0", "rollout.server.startup_timeout_s=0", "must be >"),
    ("loss.params.anchor=old", "anchor = 'old'", "one of"),
    ("train.max_nonfinite_updates=-1", "train.max_nonfinite_updates=-1", "must be >="),
    ("name=[a, b]", "name=['a', 'b']", "expected a string"),
]


@pytest.mark.parametrize("item,field,fix", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_values_once_silently_accepted(tmp_path, item, field, fix):
    check(train(tmp_path, item), 2, "config error", field, fix, run_dir=tmp_path / "run")


def test_output_dir_empty(tmp_path):
    check(drpo("train", "--output-dir", ""), 2, "output_dir=''", "--output-dir")


def test_duplicate_yaml_section(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nrollout:\n  temperature: 0.7\n"
                   "rollout:\n  top_p: 0.9\n")
    check(drpo("train", "--config", str(cfg)), 2, "duplicate key 'rollout'", "line 4",
          run_dir=tmp_path / "run")


# ----------------------------------------------------------------- hung before
def test_port_out_of_range(tmp_path):
    check(train(tmp_path, "rollout.server.port=70000"), 2, "rollout.server.port=70000", "65535",
          run_dir=tmp_path / "run")


def test_port_in_use_fails_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        text = check(train(tmp_path, f"rollout.server.port={port}"), 2,
                     f"rollout.server.port={port}", "choose a free port", run_dir=tmp_path / "run",
                     created=True)
    assert "in use" in text.lower() or "address" in text.lower()


def test_router_url_nobody_listens_on_fails_at_once(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    text = check(train(tmp_path, f"rollout.router_url={url}"), 2, f"rollout.router_url={url}",
                 "nothing answers", run_dir=tmp_path / "run", created=True)
    assert "start the router first" in text


# ----------------------------------------------------------------- tracebacks before
def test_zero_problems_after_the_prompt_filter(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n")
    check(train(tmp_path, "task.kind=math", f"task.train_file={data}", f"task.eval_files=[{data}]",
                "task.max_prompt_tokens=1"), 2, "max_prompt_tokens=1", run_dir=tmp_path / "run",
          created=True)


def test_non_utf8_data_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps({"prompt": "1+1=?", "answer": "2"}).encode() + b"\n\xff\xfe{\n")
    check(train(tmp_path, "task.kind=math", f"task.train_file={data}", f"task.eval_files=[{data}]"),
          2, f"{data}:2", "not UTF-8", run_dir=tmp_path / "run", created=True)


def test_data_row_without_answer(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=?"}) + "\n")
    check(train(tmp_path, "task.kind=math", f"task.train_file={data}", f"task.eval_files=[{data}]"),
          2, f"{data}:1", "'answer'", run_dir=tmp_path / "run", created=True)


def test_math_task_without_files(tmp_path):
    check(train(tmp_path, "task.kind=math"), 2, "task.train_file=''", "prepare_math_data",
          run_dir=tmp_path / "run")


def test_output_dir_is_a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    check(drpo("train", "--output-dir", str(f)), 2, "is a file", "--output-dir")


def test_output_dir_cannot_be_written(tmp_path):
    check(drpo("train", "--output-dir", "/proc/drpo-run"), 2, "/proc/drpo-run", "cannot be written")


def test_unknown_key_suggests_the_right_one(tmp_path):
    check(train(tmp_path, "optim.learning_rate=1e-5"), 2, "optim.learning_rate", "valid keys",
          run_dir=tmp_path / "run")


def test_unknown_loss_suggests(tmp_path):
    check(train(tmp_path, "loss.name=dppo"), 2, "'dppo'", "choose one of", run_dir=tmp_path / "run")


def test_set_without_value(tmp_path):
    check(train(tmp_path, "optim.lr"), 2, "--set 'optim.lr'", "KEY=VALUE", run_dir=tmp_path / "run")


def test_config_not_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout: [unclosed\n")
    check(drpo("train", "--config", str(cfg)), 2, str(cfg), "not valid YAML")


def test_config_not_utf8(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"name: \xff\xfe\n")
    check(drpo("train", "--config", str(cfg)), 2, str(cfg), "UTF-8")


def test_config_missing(tmp_path):
    check(drpo("train", "--config", str(tmp_path / "nope.yaml")), 2, "file not found")


def test_hf_path_missing(tmp_path):
    check(train(tmp_path, f"model.hf_path={tmp_path / 'none'}"), 2, "model.hf_path", "directory not found",
          run_dir=tmp_path / "run")


def test_world_size_mismatch(tmp_path):
    check(train(tmp_path, "parallel.gpus_per_node=2"), 2, "WORLD_SIZE=1", "torchrun",
          run_dir=tmp_path / "run")


def test_layout_does_not_divide(tmp_path):
    check(train(tmp_path, "parallel.gpus_per_node=3", "parallel.tp=2"), 2, "parallel.tp=2",
          "not divisible", run_dir=tmp_path / "run")


def test_config_show_bad_value():
    check(drpo("config", "show", "--set", "rollout.samples_per_prompt=1"), 2,
          "rollout.samples_per_prompt=1", ">= 2")


# ----------------------------------------------------------------- data lost before
def _fake_checkpoint(run_dir: Path, config: dict, step: int = 3) -> None:
    """What a resume reads before building anything: metadata.json marks a complete checkpoint,
    trainer_state.pt holds the config it was trained with."""
    ck = run_dir / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "metadata.json").write_text("{}")
    torch.save({"cursor": 0, "order": [], "step": step, "config": config}, ck / "trainer_state.pt")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def _resolved(run_dir: Path, *sets: str) -> dict:
    from drpo_megatron.config import load_config

    return load_config(None, {"output_dir": str(run_dir)}, sets=list(sets)).to_dict()


@pytest.mark.parametrize("change,field", [
    ("loss.name=pg_is", "loss.name: 'drpo' -> 'pg_is'"),
    ("model.tiny.hidden_size=64", "model.tiny.hidden_size: 128 -> 64"),
    ("optim.lr=2e-4", "optim.lr: 0.0001 -> 0.0002"),
    ("parallel.use_distributed_optimizer=false", "parallel.use_distributed_optimizer: True -> False"),
])
def test_resume_with_a_different_run_is_refused_before_anything_is_overwritten(tmp_path, change, field):
    run = tmp_path / "run"
    _fake_checkpoint(run, _resolved(run))
    before = (run / "config.yaml").read_text()
    check(train(tmp_path, change), 2, "resume from", field, "another --output-dir", run_dir=run,
          created=True)
    assert (run / "config.yaml").read_text() == before


def test_resume_may_change_steps_and_logging(tmp_path):
    from drpo_megatron.operate.rundir import unsafe_resume_changes

    run = tmp_path / "run"
    old = _resolved(run)
    assert unsafe_resume_changes(old, _resolved(run, "train.max_steps=500", "logging.writers=[jsonl]",
                                                "rollout.server.request_timeout_s=60",
                                                "parallel.tp=2", "parallel.gpus_per_node=2")) == []


def test_resume_from_a_checkpoint_older_than_a_new_config_field(tmp_path):
    from drpo_megatron.config import RunConfig
    from drpo_megatron.operate.rundir import flatten, unsafe_resume_changes

    run = tmp_path / "run"
    old = _resolved(run)
    del old["rollout"]["routing_replay"]  # saved before the field existed
    defaults = flatten(RunConfig().to_dict())
    assert unsafe_resume_changes(old, _resolved(run), defaults) == []
    assert unsafe_resume_changes(old, _resolved(run, "rollout.routing_replay=record"), defaults) == [
        "rollout.routing_replay: 'off' -> 'record'"]


def test_truncated_checkpoint_on_resume(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "metadata.json").write_text("{}")
    (ck / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    check(train(tmp_path), 1, "cannot be read", str(ck), run_dir=run, created=True)


def test_resume_flag_without_checkpoint(tmp_path):
    check(drpo("train", "--output-dir", str(tmp_path / "run"), "--resume"), 2, "--resume",
          "no checkpoint", run_dir=tmp_path / "run", created=True)


def test_dashboard_output_is_a_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/reward_mean": 0.5}) + "\n")
    check(drpo("dashboard", str(run), "-o", str(tmp_path)), 2, "is a directory", "report.html")
    assert not list(tmp_path.glob("*.tmp"))
