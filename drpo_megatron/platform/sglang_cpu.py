"""What an SGLang 0.5.23 server needs to run on a CPU-only machine (no-op with CUDA).

Fixes (each pinned by a test in ``tests/platform/test_sglang_cpu.py`` showing it is still needed):

1. ``torchvision_op_schemas``: the CPU torch 2.13.0 wheel and torchvision 0.28.0 from PyPI do not
   share an ABI, so ``torchvision/_C.so`` does not load and ``torchvision/_meta_registrations.py``
   fails with ``RuntimeError: operator torchvision::nms does not exist``.  transformers' image
   utilities (imported by SGLang at start-up) import torchvision.  Defining the two op schemas
   that module registers fake kernels for lets torchvision import; the ops themselves stay
   unavailable (nothing in a text LLM server calls them).
2. ``sgl_kernel`` stand-in (``sglang_site/sgl_kernel``): see that module.

Server flags that keep SGLang on pure-torch paths are in :data:`CPU_SERVER_ARGS`, its environment
in :data:`CPU_SERVER_ENV`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SITE_DIR = Path(__file__).resolve().parent / "sglang_site"

# Flags that keep SGLang 0.5.23 on code paths that exist without CUDA kernels.
CPU_SERVER_ARGS: tuple[str, ...] = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    # SGLang sizes its KV pool as a fraction of *host* memory on CPU; 5% of 24 GiB is plenty for
    # tiny models and keeps several servers side by side within memory.
    "--mem-fraction-static", "0.05",
)

CPU_SERVER_ENV: dict[str, str] = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keeps the torch.library.Library alive for the process lifetime


def needs_cpu_compat() -> bool:
    return not torch.cuda.is_available()


def define_torchvision_op_schemas() -> bool:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` if torchvision's own library did not.

    Returns True when schemas were defined, False when nothing was needed (CUDA machine, or the
    ops already exist because torchvision's compiled library loaded).
    """
    global _LIB
    if not needs_cpu_compat() or _LIB is not None:
        return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute access is the existence check
        return False
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for schema in _TORCHVISION_SCHEMAS.values():
        _LIB.define(schema)
    return True


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
