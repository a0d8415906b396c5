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
from subprocess_util import worker_env  # noqa: E402

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
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.fixture(scope="session")
def drpo_train():
    """:func:`run_drpo_train` (a fixture, so test modules need no import path tricks)."""
    return run_drpo_train


# ------------------------------------------------------------------ who listens where (Linux /proc)


def _session_pids(leader: int) -> list[int]:
    """Every live process of the session ``leader`` started (our launches use a new session)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of stat: the session id
            pids.append(int(d))
    return pids


def _listeners(pids: list[int]) -> set[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket the processes hold (from /proc/net)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = f[1].split(":")
            if v6:  # 32 hex digits: "::" when all zero, else kept as hex
                host = "::" if int(addr, 16) == 0 else addr
            else:  # little-endian IPv4
                host = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out.add((host, int(port, 16)))
    return out


@pytest.fixture(scope="session")
def session_pids():
    """``session_pids(leader)``: the live pids of the session ``leader`` started."""
    return _session_pids


@pytest.fixture(scope="session")
def listeners():
    """``listeners(pids)``: ``{(address, port)}`` of the TCP sockets those processes listen on."""
    return _listeners
