"""``drpo submit`` against a real SLURM on this machine (tools/slurm_local.sh: munged, MariaDB +
slurmdbd accounting, slurmctld, two slurmd n1/n2 on 127.0.0.1).

1. The embedded CPU job (tiny Qwen3-MoE, one SGLang server, colocated layout, 2 steps) submitted
   with ``drpo submit --nodes 1``: ``sacct`` says COMPLETED 0:0; the job's log directory holds the
   resolved config, the node / per-rank trainer logs and the SGLang server log; metrics.jsonl has
   steps 1..2.
2. Preemption: 20 steps with ``save_every: 1``; once a checkpoint exists the batch shell gets
   ``scancel --signal=USR1 --batch`` (what ``#SBATCH --signal=B:USR1@...`` sends before the time
   limit).  The trainer finishes its step, checkpoints, exits 75; the script requeues the job (same
   id, ``sacct --duplicates``: REQUEUED then COMPLETED 0:0, ``Restarts=1``); the second run
   resumes from that checkpoint (its log says so) and every step 1..20 is logged exactly once.

Needs root and the packages in .ci/apt-packages.txt (scripts/install.sh installs them); without them these
tests FAIL, naming the install command.  Daemons are always stopped (module fixture teardown).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "slurm_local.sh"
BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch",
            "sacct", "sacctmgr", "scontrol", "squeue", "scancel")
PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
JOB_TIMEOUT_S = 2400  # a hang guard, not a performance bound (2 cores shared by other work)


class Cluster:
    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.cache = root / "model-cache"  # the tiny model's SFT warm start, built once

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=self.env, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def submit(self, name: str, *, steps: int, save_every: int = 0) -> tuple[str, Path]:
        run = self.root / f"run-{name}"
        cfg = {
            "name": f"drpo-ci-{name}",
            "output_dir": str(run),
            "model": {"cache_dir": str(self.cache), "tiny": {"sft_steps": 60}},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12,
                        # a loaded 2-core machine needed > 300 s to start SGLang
                        "server": {"startup_timeout_s": 1800.0}},
            "loss": {"horizon": 12},
            "optim": {"updates_per_rollout": 1},
            "parallel": {"micro_batch_size": 16},  # the whole 16-sequence mini-batch
            "train": {"max_steps": steps, "eval_every": 0, "save_every": save_every},
            "logging": {"writers": ["jsonl"]},
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = self.run(sys.executable, "-m", "drpo_megatron.cli", "submit", str(path), "--nodes", "1",
                     "--rollout-nodes", "0", "--cpus-per-task", "2", "--time", "02:00:00",
                     "--python", sys.executable)
        m = re.search(r"^submitted job (\d+)", p.stdout, re.M)
        assert m, f"no job id from drpo submit:\n{p.stdout}\n{p.stderr}"
        return m.group(1), run

    def active(self, job: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job, "-o", "%i", check=False).stdout.strip())

    def wait(self, job: str, run: Path, until=None) -> None:
        """Until the job left the queue (or ``until()`` is true); fails with the logs on timeout."""
        t0 = time.time()
        while self.active(job) and not (until and until()):
            if time.time() - t0 > JOB_TIMEOUT_S:
                self.run("scancel", job, check=False)
                pytest.fail(f"job {job} still running after {JOB_TIMEOUT_S}s\n{self.logs(job, run)}")
            time.sleep(1 if until else 5)  # 1 s: catch the job between its first checkpoint and its end

    def sacct(self, job: str, final: set[str]) -> list[tuple[str, str]]:
        """(State, ExitCode) of every run of the job (--duplicates: requeued runs too), once the
        last one reached a state in ``final`` (slurmctld reports to slurmdbd asynchronously)."""
        rows: list[tuple[str, str]] = []
        for _ in range(60):
            out = self.run("sacct", "-j", job, "-X", "-n", "-P", "--duplicates",
                           "-o", "State,ExitCode").stdout
            rows = [tuple(line.split("|")[:2]) for line in out.splitlines() if line.strip()]
            if rows and rows[-1][0].split()[0] in final:
                return rows
            time.sleep(2)
        return rows

    def logs(self, job: str, run: Path) -> str:
        parts = []
        for f in sorted(run.glob(f"slurm-logs/*-{job}.sbatch.out")) + sorted(
                run.glob(f"slurm-logs/*-{job}/trainer/node-*.log")) + [run / "logs" / "trainer.log"]:
            if f.exists():
                parts.append(f"--- {f} (last 40 lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    missing = [b for b in BINARIES if shutil.which(b, path=env["PATH"]) is None]
    if missing:
        pytest.fail(f"SLURM test needs {', '.join(missing)}: install them with "
                    f"`apt-get install -y {PACKAGES}` (listed in .ci/apt-packages.txt; "
                    f"`bash scripts/install.sh` installs them as root)")
    if os.geteuid() != 0:
        pytest.fail("SLURM test needs root (it starts munged/slurmctld/slurmd and creates device nodes)")
    root = tmp_path_factory.mktemp("slurm")
    env["DRPO_SLURM_DIR"] = str(root)
    env["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    c = Cluster(root, env)
    try:
        with open(root / "start.log", "w") as out:  # daemons must not inherit a pytest pipe
            rc = subprocess.run(["bash", str(TOOL), "start"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300).returncode
        if rc != 0:
            logs = "".join(f"\n--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:])
                           for f in [root / "start.log", *sorted((root / "log").glob("*.log"))])
            pytest.fail(f"tools/slurm_local.sh start failed ({rc}):{logs}")
        yield c
    finally:
        subprocess.run(["bash", str(TOOL), "stop"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)


def _steps(run: Path) -> list[int]:
    """The training steps metrics.jsonl logged, in order (one row per logged step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("step", 0) >= 1 and "loss/policy_loss" in r]


@pytest.mark.extended  # the USR1 test's job checks the same files and also completes (after a requeue)
def test_submit_embedded_job_completes(cluster):
    job, run = cluster.submit("complete", steps=2)
    cluster.wait(job, run)
    rows = cluster.sacct(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})
    assert rows == [("COMPLETED", "0:0")], f"sacct: {rows}\n{cluster.logs(job, run)}"

    logdir = run / "slurm-logs" / f"drpo-ci-complete-{job}"
    resolved = yaml.safe_load((logdir / "config.yaml").read_text())
    assert resolved["output_dir"] == str(run) and resolved["train"]["max_steps"] == 2
    assert resolved["parallel"]["num_nodes"] == 1 and resolved["parallel"]["rollout_nodes"] == 0
    assert "trainer exited with 0" in (logdir / "sbatch.out").read_text()
    node_logs = list((logdir / "trainer").glob("node-*.log"))
    assert node_logs and "done: 2 steps" in node_logs[0].read_text()
    assert list((logdir / "trainer" / "ranks").rglob("stderr.log")), "no per-rank torchrun log"
    assert (logdir / "rollout" / "sglang-0.log").stat().st_size > 0, "no per-server SGLang log"
    assert _steps(run) == [1, 2]


def test_usr1_checkpoints_requeues_and_resumes(cluster):
    steps = 12  # 1-5 s per step with a save each: time to signal mid-run (sent after the first save)
    job, run = cluster.submit("preempt", steps=steps, save_every=1)
    trainer_log = run / "logs" / "trainer.log"
    saved = re.compile(r"saved checkpoint of step (\d+)")
    cluster.wait(job, run, until=lambda: trainer_log.exists() and saved.search(trainer_log.read_text()))
    assert cluster.active(job), f"job {job} ended before its first checkpoint\n{cluster.logs(job, run)}"
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.wait(job, run)

    rows = cluster.sacct(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})
    assert rows == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], f"sacct: {rows}\n{cluster.logs(job, run)}"
    assert re.search(r"\bRestarts=1\b", cluster.run("scontrol", "show", "job", job).stdout)

    logdir = run / "slurm-logs" / f"drpo-ci-preempt-{job}"
    out = (logdir / "sbatch.out").read_text()
    assert "got SIGUSR1" in out and f"requeueing job {job} (restart 1)" in out, out
    assert "preemption checkpoint of step" in out and out.rstrip().endswith("trainer exited with 0"), out
    log = trainer_log.read_text()
    pre = re.search(r"preempted \(stop file .*?\): saved the checkpoint of step (\d+)", log)
    assert pre, f"no preemption line in {trainer_log}\n{cluster.logs(job, run)}"
    k = int(pre.group(1))
    assert 1 < k < steps  # the signal came during step >= 2, after the step-1 checkpoint
    assert re.search(rf"resumed from \S+ at step {k} \(data cursor \d+\); continuing at step {k + 1}", log)
    assert log.index(pre.group(0)) < log.index(f"at step {k} (data cursor")
    # every step exactly once: 1..k by the first run, k+1..steps by the requeued one
    assert _steps(run) == list(range(1, steps + 1))
    # what drpo submit leaves next to the job: the resolved config, per-node, per-rank and
    # per-server logs
    resolved = yaml.safe_load((logdir / "config.yaml").read_text())
    assert resolved["output_dir"] == str(run) and resolved["train"]["max_steps"] == steps
    assert resolved["parallel"]["num_nodes"] == 1 and resolved["parallel"]["rollout_nodes"] == 0
    assert list((logdir / "trainer").glob("node-*.log")), "no per-node trainer log"
    assert list((logdir / "trainer" / "ranks").rglob("stderr.log")), "no per-rank torchrun log"
    assert (logdir / "rollout" / "sglang-0.log").stat().st_size > 0, "no per-server SGLang log"
