"""How tests launch the real thing in a subprocess: one environment and one runner for Python
scripts, ``python -m drpo_megatron.cli`` and torchrun (Megatron patches process-wide state, so
every Megatron run happens in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from drpo_megatron.dist import free_port

ROOT = Path(__file__).resolve().parents[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The test process's environment for a worker: one thread per process (gloo with more is
    50x slower on 2 cores), no hub access, the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_python(args, timeout: float, check: bool = True, **extra_env: str
               ) -> subprocess.CompletedProcess:
    """``python ARGS...`` from the repository root; with ``check`` a non-zero exit fails the
    test showing the last 6000 characters of stdout + stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=worker_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def torchrun_args(nproc: int) -> list[str]:
    """``-m torch.distributed.run`` arguments for ``nproc`` local ranks on a free port."""
    return ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def small_run_config(cache_dir, *, steps: int, **sections) -> dict:
    """The run config of the loop's end-to-end tests: the embedded tiny policy with a short warm
    start (cached in ``cache_dir``), 4 prompts x 4 samples of at most 12 tokens, 2 updates per
    step, no eval, metrics to jsonl; ``sections`` update it (``rollout={...}``, ``train={...}``)."""
    cfg = {
        "model": {"cache_dir": str(cache_dir), "tiny": {"sft_steps": 60}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12},
        "loss": {"horizon": 12},
        "optim": {"updates_per_rollout": 2},
        "train": {"max_steps": steps, "eval_every": 0, "save_every": 0},
        "logging": {"writers": ["jsonl"]},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def drpo_train_cmd(cfg_path, out, *extra: str) -> list[str]:
    """``python -m drpo_megatron.cli train --config CFG --output-dir OUT EXTRA...``."""
    return [sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(cfg_path),
            "--output-dir", str(out), *map(str, extra)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a ``drpo train`` process and every process it started (its SGLang servers run in
    sessions of their own), then reap it: what a crashed node does to a run."""
    import signal

    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.kill(proc.pid, signal.SIGKILL)
    for kid in kids:
        try:
            os.killpg(kid.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=60)


def kill_after_checkpoint(ref_cmd: list[str], cmd: list[str], run, logs, *, steps: int,
                          timeout: float = 900) -> None:
    """Start the uninterrupted reference run ``ref_cmd`` and ``cmd`` (into ``run``) at once;
    SIGKILL ``cmd`` (:func:`kill_tree`) once ``run`` holds a checkpoint, check it had not logged
    all ``steps``, and wait for the reference to exit 0.  stderr goes to ``logs/{a,b}.err``."""
    import time

    logs = Path(logs)
    a = subprocess.Popen(ref_cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL,
                         stderr=open(logs / "a.err", "w"))
    b = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL,
                         stderr=open(logs / "b.err", "w"))
    try:
        deadline = time.time() + timeout
        while not (Path(run) / "checkpoint" / "trainer_state.pt").exists():
            assert b.poll() is None, (logs / "b.err").read_text()[-4000:]
            assert time.time() < deadline, f"no checkpoint in {run} after {timeout:.0f} s"
            time.sleep(0.5)
        kill_tree(b)
        assert max(step_metrics(run), default=0) < steps  # really interrupted
        assert a.wait(timeout=1200) == 0, (logs / "a.err").read_text()[-4000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                kill_tree(p)


def build_tiny_policy(cache_dir, timeout: float = 600) -> None:
    """Build the warm-started tiny policy of :func:`small_run_config` into ``cache_dir`` once,
    before runs that share it start at the same time (each would build it otherwise)."""
    subprocess.run([sys.executable, "-c",
                    "import sys; from drpo_megatron.platform import apply_cpu_compat; "
                    "apply_cpu_compat(); from drpo_megatron.models.tiny import "
                    "TinyModelConfig, ensure_tiny_checkpoint; "
                    "ensure_tiny_checkpoint(sys.argv[1], TinyModelConfig(sft_steps=60), "
                    "show_progress=False)", str(cache_dir)],
                   cwd=ROOT, env=worker_env(), check=True, timeout=timeout)


def step_metrics(run) -> dict:
    """The last logged training metrics of each step >= 1 of a run directory (a killed run may
    have logged a step past its checkpoint; the resumed run's row comes last)."""
    import json

    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("step", 0) >= 1 and "loss/policy_loss" in m:
            out[m["step"]] = m
    return out


def server_processes(cache) -> list:
    """Live SGLang server / tether processes serving the policy in ``cache`` (their command line
    names it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(cache) in cmd and ("sglang" in cmd or "tether" in cmd):
            found.append(p)
    return found
