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
