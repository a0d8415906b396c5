"""What an SGLang 0.5.23 server needs to run on a CPU-only machine (no-op with CUDA).

Fixes (each pinned by a test in ``tests/platform/test_sglang_cpu.py`` showing it is still needed):

1. ``torchvision_op_schemas`` (:mod:`drpo_megatron.platform.torchvision_ops`): torchvision's
   compiled ops do not load against the CPU torch wheel; SGLang imports it via transformers.
2. ``sgl_kernel`` stand-in (``sglang_site/sgl_kernel``): see that module.

Server flags that keep SGLang on pure-torch paths are in :data:`CPU_SERVER_ARGS`, its environment
in :data:`CPU_SERVER_ENV`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from drpo_megatron.platform.torchvision_ops import define_torchvision_op_schemas  # noqa: F401

SITE_DIR = Path(__file__).resolve().parent / "sglang_site"

# Flags that keep SGLang 0.5.23 on code paths that exist without CUDA kernels.
CPU_SERVER_ARGS: tuple[str, ...] = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    # On CPU SGLang budgets the KV pool from *system* free memory: pool = free-after-load -
    # (1 - f) * free-before-load, so any memory another process (the trainer building its model,
    # a second server) takes while this one loads is charged to it. f = 0.05 failed at start-up
    # on a busy machine ("Loaded weights leave no GPU memory for the KV cache"); f = 0.3 leaves
    # a wide margin, and --max-total-tokens caps what the pool really allocates.
    "--mem-fraction-static", "0.3",
    "--max-total-tokens", "131072",
)

CPU_SERVER_ENV: dict[str, str] = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}



def needs_cpu_compat() -> bool:
    return not torch.cuda.is_available()


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang server subprocess: on CPU adds the site folder (sgl_kernel
    stand-in + sitecustomize) in front of ``PYTHONPATH`` and the CPU engine variables."""
    env = dict(os.environ if base is None else base)
    if needs_cpu_compat():
        parts = [str(SITE_DIR), str(SITE_DIR.parents[2])]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env.update(CPU_SERVER_ENV)
    return env


def server_args() -> list[str]:
    return list(CPU_SERVER_ARGS) if needs_cpu_compat() else []
