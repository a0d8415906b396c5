"""Checkpoint state that loads without running code (docs/operate.md, Security).

Unpickling can call any function, and a checkpoint directory is data that somebody else may have
written or replaced.  So nothing of a checkpoint is unpickled unrestricted:

* ``trainer_state.pt`` and ``rng_rank<R>.pt`` hold tensors and plain Python types only and load
  with ``torch.load(weights_only=True)`` (:func:`load_plain`).  The numpy RNG state, a ``uint32``
  array, is stored as a tensor (:func:`plain_rng_states`).  Files written before that change hold
  the array itself: the three numpy globals that rebuild a ``uint32`` array (and nothing else)
  are allowed for them.
* A torch_dist checkpoint's ``.metadata`` (torch.distributed.checkpoint) is a plain pickle that
  torch 2.13 reads with ``pickle.load``: :func:`check_dcp_metadata` reads it first with an
  unpickler that resolves only the classes such a file holds (``DCP_METADATA_GLOBALS``, torch
  dtypes/layouts/memory formats) and refuses anything else.

A refusal raises :class:`UnsafeCheckpointError` naming the file and the object it asked for.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drpo_megatron.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks for objects that a checkpoint written by drpo never holds."""


# the globals a numpy uint32 array pickles to (numpy 2.x; legacy rng_rank*.pt files)
_LEGACY_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]

# (module, name) of every class a torch 2.13 DCP .metadata file refers to (found by reading a
# Megatron torch_dist checkpoint of ours and a plain dcp.save, whose StorageMeta holds the
# checkpoint path), plus OrderedDict
DCP_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
})
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32, torch.strided


def _refusal(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to load it: it asks for {what}, which a checkpoint written by drpo "
        f"never holds (unpickling it could run code). If you did not write this checkpoint, "
        f"delete it; see docs/operate.md, Security")


def plain_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """``states`` (:func:`~drpo_megatron.models.megatron_model.rng_states`) with the numpy state
    as tensors and plain types: what ``torch.load(weights_only=True)`` reads back."""
    out = dict(states)
    if "numpy" in states:
        name, key, pos, has_gauss, cached = states["numpy"]
        out["numpy"] = {"bit_generator": str(name),
                        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}
    return out


def restore_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`plain_rng_states` (a legacy numpy tuple passes unchanged)."""
    out = dict(states)
    s = states.get("numpy")
    if isinstance(s, dict):
        out["numpy"] = (s["bit_generator"], s["key"].numpy().astype(np.uint32), s["pos"],
                        s["has_gauss"], s["cached_gaussian"])
    return out


def load_plain(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python types (and the numpy
    ``uint32`` arrays of legacy RNG files); anything else raises :class:`UnsafeCheckpointError`."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the object in one line: "Trying to load unsupported GLOBAL posix.system ..."
        why = next((ln.strip() for ln in str(e).splitlines()
                    if "GLOBAL" in ln or "Unsupported" in ln), str(e).splitlines()[0])
        raise _refusal(path, f"more than tensors and plain types ({why})") from None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: Path):
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise _refusal(self.path, f"the global {module}.{name}")


def check_dcp_metadata(ckpt_dir: str | os.PathLike) -> None:
    """Read every ``*.metadata`` pickle of a torch_dist checkpoint with the restricted unpickler
    (nothing outside ``DCP_METADATA_GLOBALS`` is resolved, so nothing runs) before torch reads it
    with ``pickle.load``; raises :class:`UnsafeCheckpointError` on anything else."""
    for path in sorted(Path(ckpt_dir).glob("*.metadata")):
        with open(path, "rb") as fh:
            try:
                _MetadataUnpickler(fh, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a corrupt pickle is refused as well
                raise UnsafeCheckpointError(f"{path}: cannot be read as checkpoint metadata "
                                            f"({type(e).__name__}: {e})") from None
