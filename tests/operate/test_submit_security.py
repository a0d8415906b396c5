"""sbatch scripts carry hostile values as data, never as code (operate/submit.py, slurm/*.tmpl).

Scripts are rendered with values full of shell syntax (``$(...)``, backticks, quotes, ``;``,
globs) in every field that reaches the script body (interpreter, repository path, resolved
config path, model path, SGLang arguments) and run with ``bash`` under stand-in ``srun``,
``scontrol``, ``scancel``, ``curl`` and Python (a recorder at a path that is itself hostile):
nothing of the payload runs, and every value reaches the command it is meant for byte for byte.
Values that SLURM reads from ``#SBATCH`` lines (job name, log root, partition) and control
characters (a newline would start a new command) are refused naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from drpo_megatron.config import load_config
from drpo_megatron.operate.submit import SubmitError, render

ROOT = Path(__file__).resolve().parents[2]
# shell syntax that runs `touch pwned-N` in the working directory if it is ever evaluated, in
# any quoting context a template could paste it into (no "/": it is also a file name)
HOSTILE = ("x $(touch pwned-1) `touch pwned-2` x'; touch pwned-3; ' x\"; touch pwned-4; \" "
           "x; touch pwned-5 && touch pwned-6 * $HOME ${IFS}")

RECORDER = """#!{python}
# stand-in for the compute nodes' Python: records its arguments, plays the part asked for
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"argv": args, "key_file": os.environ.get("DRPO_API_KEY_FILE")}}) + "\\n")
if args[:3] == ["-m", "drpo_megatron.rollout.launch", "new-key"]:
    from drpo_megatron.rollout.auth import create_key_file
    create_key_file(args[3])
elif args[:3] == ["-m", "drpo_megatron.rollout.launch", "workers"]:
    print(os.environ["STUB_WORKERS"])
"""
SRUN = """#!/bin/bash
# stand-in srun: drop the options, run the command here
while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") for n in $STUB_NODES; do echo "$n"; done ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=$3" ;;
  *) echo "scontrol $*" >> "$STUB_CALLS" ;;
esac
"""


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH folder of stand-ins, and the hostile-named folder with the stand-in Python."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL,
                       "scancel": '#!/bin/bash\necho "scancel $*" >> "$STUB_CALLS"\n',
                       "curl": "#!/bin/bash\nexit 0\n"}.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    evil = tmp_path / HOSTILE
    evil.mkdir()
    py = evil / "python"
    py.write_text(RECORDER.format(python=sys.executable))
    py.chmod(0o755)
    return bin_, evil


def _config(tmp_path: Path, rollout_nodes: int, model_path: str, extra_args: list[str]):
    base = ("model_configs/qwen3_4b_base_bf16.yaml" if rollout_nodes else
            "model_configs/deepseek_r1_distill_qwen_1_5b_bf16.yaml")
    over = {"parallel": {"num_nodes": 1, "rollout_nodes": rollout_nodes, "gpus_per_node": 2},
            "model": {"hf_path": model_path},
            "rollout": {"server": {"extra_args": extra_args}}}
    return load_config(ROOT / base, over)


def _run(tmp_path: Path, text: str, nodes: int, workers: int) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               STUB_LOG=str(tmp_path / "python-calls.jsonl"), STUB_CALLS=str(tmp_path / "calls"),
               STUB_NODES=" ".join(f"n{i + 1}" for i in range(nodes)), STUB_WORKERS=str(workers),
               SLURM_JOB_ID="7", SLURM_JOB_NAME="job", SLURM_JOB_NODELIST=f"n[1-{nodes}]",
               PYTHONPATH=str(ROOT))
    env.pop("DRPO_API_KEY_FILE", None)
    return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(ln) for ln in (tmp_path / "python-calls.jsonl").read_text().splitlines()]


def _no_payload_ran(tmp_path: Path) -> None:
    ran = sorted(p.name for p in tmp_path.rglob("pwned-*"))
    assert not ran, f"the payload ran: {ran}"


@pytest.mark.parametrize("context", ["{}", "'{}'", '"{}"', "bash -c '{}'"])
def test_the_payload_is_live(tmp_path, context):
    """The control: pasted into a script as text (unquoted, in single or double quotes, or in a
    `bash -c '...'` as the old templates did), the value runs commands."""
    subprocess.run(["bash", "-c", "echo " + context.format(HOSTILE)], cwd=tmp_path,
                   capture_output=True, timeout=30)
    assert list(tmp_path.glob("pwned-*"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash")
def test_disaggregated_script_carries_hostile_values_as_data(tmp_path):
    _, evil = _stubs(tmp_path)
    repo = evil / "repo"
    (repo / "slurm").mkdir(parents=True)
    shutil.copy(ROOT / "slurm" / "common.sh", repo / "slurm" / "common.sh")
    resolved = evil / "config.yaml"
    resolved.write_text("name: job\n")
    model = f"/models/{HOSTILE}"
    extra = [HOSTILE, "--context-length", "4096", "--json-model-override-args", '{"a": "$(b)"}']
    cfg = _config(tmp_path, 1, model, extra)
    text = render(cfg, nodes=1, rollout_nodes=1, resolved_config=str(resolved),
                  log_root=str(tmp_path / "logs"), python=str(evil / "python"), repo=str(repo),
                  cpus_per_task=2)
    p = _run(tmp_path, text, nodes=2, workers=2)
    assert p.returncode == 0, p.stderr[-3000:]
    _no_payload_ran(tmp_path)
    calls = _calls(tmp_path)
    by = {tuple(c["argv"][:3]): c for c in calls}
    key_file = tmp_path / "logs" / "job-7" / "secrets" / "api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # the servers: the model path and every SGLang argument byte for byte, bound to the node's
    # address (127.0.0.1 here), the key file by path in the environment, the key in no argv
    sglang = [c for c in calls if c["argv"][:3] == ["-m", "drpo_megatron.rollout.launch", "sglang"]]
    assert len(sglang) == 2  # 2 GPUs per node / rollout_tp 1
    for c in sglang:
        a = c["argv"]
        assert a[a.index("--model-path") + 1] == model
        assert a[a.index("--host") + 1] == "127.0.0.1"
        assert a[-len(extra):] == extra
        assert c["key_file"] == str(key_file)
    router = by[("-m", "drpo_megatron.rollout.launch", "router")]["argv"]
    assert router[router.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in router
    registered = [c["argv"][3:] for c in calls if c["argv"][2] == "register"]
    assert sorted(registered) == [["http://127.0.0.1:30000", f"http://127.0.0.1:{p}"]
                                  for p in (31000, 31001)]
    assert ("-m", "torch.distributed.run", "--nnodes=1") in by
    key = key_file.read_text().strip()
    assert not any(key in " ".join(c["argv"]) for c in calls)
    assert (tmp_path / "logs" / "job-7" / "config.yaml").read_text() == "name: job\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash")
def test_colocated_script_carries_hostile_values_as_data(tmp_path):
    _, evil = _stubs(tmp_path)
    repo = evil / "repo"
    (repo / "slurm").mkdir(parents=True)
    shutil.copy(ROOT / "slurm" / "common.sh", repo / "slurm" / "common.sh")
    resolved = evil / "config.yaml"
    resolved.write_text("name: job\n")
    cfg = _config(tmp_path, 0, f"/models/{HOSTILE}", [HOSTILE])
    text = render(cfg, nodes=1, rollout_nodes=0, resolved_config=str(resolved),
                  log_root=str(tmp_path / "logs"), python=str(evil / "python"), repo=str(repo),
                  cpus_per_task=2)
    p = _run(tmp_path, text, nodes=1, workers=0)
    assert p.returncode == 0, p.stderr[-3000:]
    _no_payload_ran(tmp_path)
    (trainer,) = _calls(tmp_path)
    assert trainer["argv"][:2] == ["-m", "torch.distributed.run"]
    assert trainer["argv"][-2:] == ["--config", str(tmp_path / "logs" / "job-7" / "config.yaml")]


def _refused(tmp_path, match, *, rollout_nodes=1, model="/models/m", extra=(), name=None, **kw):
    cfg = _config(tmp_path, rollout_nodes, model, list(extra))
    if name is not None:
        cfg.name = name
    args = dict(nodes=1, rollout_nodes=rollout_nodes, resolved_config="/r/config.yaml",
                log_root="/r/logs", cpus_per_task=2)
    args.update(kw)
    with pytest.raises(SubmitError, match=match):
        render(cfg, **args)


@pytest.mark.parametrize("case", [
    dict(name="job\ntouch pwned", match=r"^name='job\\ntouch pwned' holds a control character"),
    dict(name="job $(touch pwned)", match=r"^name=.*SLURM reads it unquoted from an #SBATCH line"),
    dict(log_root="/r/$(touch pwned)", match=r"^--log-root \(default <output_dir>/slurm-logs\)="),
    dict(log_root="/r/my logs", match=r"^--log-root .*may hold only letters"),
    dict(log_root="/r/%j", match=r"^--log-root"),
    dict(partition="gpu\n#SBATCH --qos=high", match=r"^--partition=.*control character"),
    dict(account="acct;touch pwned", match=r"^--account=.*SLURM reads it unquoted"),
    dict(model="/models/m\ntouch pwned", match=r"^model.hf_path=.*control character"),
    dict(extra=["--x", "a\rb"], match=r"^rollout.server.extra_args=.*control character"),
    dict(python="/usr/bin/python\n", match=r"^--python=.*control character"),
    dict(resolved_config="/r/\x1b[31m/config.yaml", match=r"^output_dir=.*control character"),
    dict(time="1:00:00\n", match=r"^--time="),
    dict(cpus_per_task=0, match=r"^--cpus-per-task=0 must be >= 1"),
], ids=lambda c: c["match"].split("=")[0].strip("^\\").split(" ")[0])
def test_unsafe_values_are_refused_naming_the_field(tmp_path, case):
    case = dict(case)
    _refused(tmp_path, **case)


def test_bind_interface_is_an_interface_name(tmp_path):
    cfg = _config(tmp_path, 1, "/models/m", [])
    cfg.rollout.server.bind_interface = "ib0; touch pwned"
    with pytest.raises(SubmitError, match=r"rollout.server.bind_interface='ib0; touch pwned' "
                                          r"is not a network interface name"):
        render(cfg, nodes=1, rollout_nodes=1, resolved_config="/r/c.yaml", log_root="/r/l",
               cpus_per_task=2)
    cfg.rollout.server.bind_interface = "lo"
    text = render(cfg, nodes=1, rollout_nodes=1, resolved_config="/r/c.yaml", log_root="/r/l",
                  cpus_per_task=2)
    assert "export DRPO_BIND_INTERFACE=lo " in text


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2")
def test_bind_addr_of_an_interface_and_of_the_node(tmp_path):
    """drpo_bind_addr (common.sh): the interface's IPv4 address, else the node's SLURM NodeAddr
    resolved; never 0.0.0.0; a missing interface is an error naming the setting."""
    _stubs(tmp_path)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               STUB_CALLS=str(tmp_path / "calls"))

    def addr(iface):
        return subprocess.run(["bash", "-c", f"source {ROOT}/slurm/common.sh; "
                               f"DRPO_BIND_INTERFACE={iface} drpo_bind_addr n1"], env=env,
                              capture_output=True, text=True)
    assert addr("lo").stdout.strip() == "127.0.0.1"
    assert addr("''").stdout.strip() == "127.0.0.1"  # the stand-in scontrol's NodeAddr
    bad = addr("nosuchif0")
    assert bad.returncode == 1 and "set rollout.server.bind_interface" in bad.stderr
