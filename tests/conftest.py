"""Test session setup: on a machine without CUDA apply the CPU compatibility layer once, as the
``drpo`` CLI does, so that in-process imports of transformers / Megatron work. (A no-op on CUDA.
Tests that show a fix is still needed run their check in a fresh subprocess without it.)"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from drpo_megatron.platform import apply_cpu_compat  # noqa: E402

apply_cpu_compat()


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_drpo_train(cfg: dict, root: Path, *, name: str = "run", nproc: int = 1,
                   master_port: int | None = None, timeout: float = 1200) -> Path:
    """``drpo train`` on the config dict ``cfg`` (written to ``root/<name>.yaml``) into
    ``root/<name>``, under torchrun with ``nproc`` > 1 ranks; asserts it exits 0 (the message
    carries the tails of its stdout and stderr)."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / name
    args = ["-m", "drpo_megatron.cli", "train", "--config", str(path), "--output-dir", str(out)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(master_port or 29500), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.fixture(scope="session")
def drpo_train():
    """:func:`run_drpo_train` (a fixture, so test modules need no import path tricks)."""
    return run_drpo_train
