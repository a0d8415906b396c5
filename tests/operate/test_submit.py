"""``drpo submit --dry-run``: rendered sbatch scripts for several layouts equal the reviewed
golden files (tests/operate/golden; regenerate with DRPO_UPDATE_GOLDEN=1 and review the diff),
are valid bash, and bad layouts are refused before anything is written."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from drpo_megatron.config import load_config
from drpo_megatron.operate.submit import main, render

GOLDEN = Path(__file__).parent / "golden"
CASES = {  # golden name: (config, trainer nodes, rollout nodes)
    "qwen3_30b_a3b_fp8_e2e_2+2": ("model_configs/qwen3_30b_a3b_base_fp8_e2e.yaml", 2, 2),
    "qwen3_4b_bf16_1+1": ("model_configs/qwen3_4b_base_bf16.yaml", 1, 1),
    "r1_distill_1_5b_colocated_1": ("model_configs/deepseek_r1_distill_qwen_1_5b_bf16.yaml", 1, 0),
}


def _render(name):
    path, nodes, rnodes = CASES[name]
    cfg = load_config(path, {"parallel": {"num_nodes": nodes, "rollout_nodes": rnodes}})
    return render(cfg, nodes=nodes, rollout_nodes=rnodes, repo="/opt/drpo-megatron",
                  resolved_config="/runs/job/submit/config.yaml", log_root="/runs/job/slurm-logs",
                  python="/opt/venv/bin/python")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(name, tmp_path):
    text = _render(name)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("DRPO_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered {name} differs from {golden}"
    script = tmp_path / "s.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "{{" not in text


def test_layout_specific_lines():
    d = _render("qwen3_30b_a3b_fp8_e2e_2+2")
    assert "#SBATCH --nodes=4" in d and "--nnodes=2 --nproc-per-node=8" in d
    assert "NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1" in d and "--quantization fp8" in d
    assert "drpo_wait_router \"$DRPO_ROUTER_URL\" 4 1800" in d   # 2 nodes x 2 TP4 servers
    assert "#SBATCH --signal=B:USR1@900" in d and "#SBATCH --requeue" in d
    c = _render("r1_distill_1_5b_colocated_1")
    assert "COLOCATED" in c and "sglang_router" not in c and "#SBATCH --nodes=1" in c
    assert "NVTE_FP8" not in c and "--quantization" not in c


def test_common_sh_is_valid_bash_and_sets_nccl():
    common = Path("slurm/common.sh")
    assert subprocess.run(["bash", "-n", str(common)]).returncode == 0
    text = common.read_text()
    for var in ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_DEVICE_MAX_CONNECTIONS",
                "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "scontrol requeue"):
        assert var in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash")
@pytest.mark.parametrize("case", ["USR1", "TERM", "no-signal", "ignores-stop-file"])
def test_batch_shell_signal_protocol(tmp_path, case):
    """slurm/common.sh as the batch script runs it (set -euo pipefail, traps, trainer in the
    background, drpo_wait_trainer), with a stand-in trainer that behaves like
    drpo_megatron/operate/preempt.py (stop file -> marker + exit 75) and a stand-in scontrol that
    records its calls (the real SLURM round trip is tests/operate/test_slurm_local.py)."""
    (tmp_path / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$LOG\"\n")
    (tmp_path / "scontrol").chmod(0o755)
    ignores = case == "ignores-stop-file"
    trainer = ("sleep 60" if ignores else
               'while [ ! -e "$DRPO_STOP_FILE" ]; do sleep 0.1; done; echo ckpt >> "$LOG"; '
               'echo "3 now" > "$DRPO_STOP_FILE.checkpointed"; exit 75')
    if case == "no-signal":
        trainer = "exit 3"
    sig = {"USR1": "USR1", "TERM": "TERM", "ignores-stop-file": "USR1"}.get(case)
    script = f"""set -euo pipefail
source slurm/common.sh
export LOG={tmp_path}/calls DRPO_STOP_FILE={tmp_path}/STOP DRPO_CKPT_GRACE_S={1 if ignores else 30} SLURM_JOB_ID=42
trap 'drpo_on_signal USR1' USR1
trap 'drpo_on_signal TERM' TERM
touch "$LOG"
bash -c '{trainer}' &
DRPO_TRAIN_PID=$!
{f"( sleep 0.5; kill -{sig} $$ ) &" if sig else ""}
drpo_wait_trainer
echo unreachable >> "$LOG"
"""
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    if case == "USR1":  # checkpoint first, then the requeue; the script ends with 0
        assert (p.returncode, calls) == (0, ["ckpt", "scontrol requeue 42"]), p.stderr
        assert "preemption checkpoint of step 3 saved" in p.stderr
    elif case == "TERM":  # scancel / preemption: checkpoint, no requeue by the script
        assert (p.returncode, calls) == (75, ["ckpt"]), p.stderr
    elif case == "no-signal":  # the trainer's own status, nothing else
        assert (p.returncode, calls) == (3, []), p.stderr
    else:  # no checkpoint within the grace period: the trainer is stopped, no requeue
        assert (p.returncode, calls) == (128 + 15, []), p.stderr
        assert "no checkpoint after 1s" in p.stderr
    assert (tmp_path / "STOP").exists() == (sig is not None)


def test_cli_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path("model_configs/qwen3_4b_base_bf16.yaml").read_text().replace(
        "output_dir: runs/qwen3-4b-base-bf16-drpo", f"output_dir: {tmp_path}/run"))
    assert main([str(cfg), "--nodes", "2", "--rollout-nodes", "1", "--dry-run",
                 "--cpus-per-task", "8"]) == 0
    out = capsys.readouterr()
    assert "#SBATCH --nodes=3" in out.out and "#SBATCH --cpus-per-task=8" in out.out
    assert "dry run: nothing written" in out.err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_bad_layout_without_writing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path("model_configs/qwen3_30b_a3b_base_bf16.yaml").read_text().replace(
        "output_dir: runs/qwen3-30b-a3b-base-bf16-drpo", f"output_dir: {tmp_path}/run").replace(
        "ep: 8", "ep: 6"))
    assert main([str(cfg), "--nodes", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.ep=6" in err[0]
    assert not (tmp_path / "run").exists()
