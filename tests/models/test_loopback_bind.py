"""A single-process trainer listens on loopback only (models/megatron_model.py init_distributed):
torch's TCPStore on 127.0.0.1 (not on every interface, as it does when given a host name) and
gloo on the loopback interface.  Checked in a fresh process, from /proc, while the process group
and Megatron's groups exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
from drpo_megatron.platform import apply_cpu_compat
apply_cpu_compat()
from drpo_megatron.models import megatron_model as mm
mm.init_distributed(seed=1)
import torch, torch.distributed as dist
x = torch.ones(2)
dist.all_reduce(x)  # the world works
print(json.dumps({{"pid": os.getpid(), "gloo": os.environ.get("GLOO_SOCKET_IFNAME")}}), flush=True)
sys.stdin.readline()  # alive until the parent has looked
"""


def test_single_process_world_listens_on_loopback_only(listeners):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "GLOO_SOCKET_IFNAME")}
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()[-3000:]
        info = json.loads(line)
        found = listeners([info["pid"]])
    finally:
        p.communicate("\n", timeout=120)
    assert found, "the store listens somewhere"
    assert {h for h, _ in found} == {"127.0.0.1"}, found
    assert info["gloo"] == "lo"
