"""tools/gpu_check.py without a GPU: the CPU smoke run executes every section's code path (train
with recompute none/full, log-prob, policy-loss and FP8 benches, the colocated memory sequence);
the wheel list stays within its budget; asking for CUDA on a CPU machine is a clear error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_check.py"


def _run(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_list():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements" / "gpu-check.txt").read_text().splitlines()]
    names = [re.split(r"[=<>]", ln)[0] for ln in lines if ln]
    assert names == ["megatron-core", "torch_memory_saver", "numpy", "packaging"]
    assert "megatron-core==0.19.2" in lines  # the version the project pins


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_requested_without_cuda_is_refused():
    p = _run("--device", "cuda", timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "--device cpu --smoke" in p.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    p = _run("--device", "cpu", "--smoke", "--json", out, "--markdown", md)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    secs = res["sections"]
    assert list(secs) == ["train", "logprobs", "losses", "fp8", "colocate"]
    assert all(s["ok"] for s in secs.values())
    runs = {r["recompute"]: r for r in secs["train"]["runs"]}
    assert set(runs) == {"none", "full"} and all(r["finite"] for r in runs.values())
    assert runs["none"]["losses"][0] == runs["full"]["losses"][0]  # same init, recompute: same loss
    assert secs["logprobs"]["rows"] and secs["losses"]["rows"] and secs["fp8"]["rows"]
    assert secs["colocate"]["checks"]["weights equal after resume + push"]
    text = md.read_text()
    assert "MoE train step, recompute full" in text and "colocate:" in text
    assert res["wall_s"] < 480  # the GPU run's budget; the CPU smoke run must fit it too
