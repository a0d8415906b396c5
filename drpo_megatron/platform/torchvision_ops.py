"""torchvision op schemas for the CPU stack (shared by the Megatron and SGLang CPU layers).

torchvision 0.28.0's ``_C.so`` does not load against the torch 2.13.0 CPU build, and
``torchvision/_meta_registrations.py`` then fails with ``RuntimeError: operator
torchvision::nms does not exist`` on import.  transformers imports torchvision (image utilities,
``modeling_utils``), so the trainer, megatron-bridge and the SGLang server all hit it.  Defining
the two schemas that module registers fake kernels for (``nms``, ``qnms``) lets torchvision
import; no kernel is registered, so calling the ops still raises.
"""

from __future__ import annotations

import importlib.util
from typing import Any, List

import torch

SCHEMA = "{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_KEEP_ALIVE: List[Any] = []  # the Library objects must outlive the call


def define_torchvision_op_schemas() -> bool:
    """Define the missing schemas; returns True when something was defined. No-op with CUDA."""
    if torch.cuda.is_available() or importlib.util.find_spec("torchvision") is None:
        return False
    missing = []
    for op in ("nms", "qnms"):
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        except RuntimeError:
            missing.append(op)
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in missing:
        lib.define(SCHEMA.format(op=op))
    _KEEP_ALIVE.append(lib)
    return True
