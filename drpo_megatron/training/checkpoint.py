"""Megatron checkpoints of the actor: model + optimizer (``dist_checkpointing``, reshardable),
per-rank RNG states and the trainer's state (data cursor, step), written atomically.

Layout of a checkpoint directory: ``metadata.json`` + torch_dist shards (model, optimizer,
step), ``rng_rank<R>.pt`` per rank, ``trainer_state.pt`` (rank 0).  Save writes
``<dir>.tmp``, moves the previous checkpoint to ``<dir>.old`` and renames the new one into place,
so a kill at any point leaves a complete checkpoint that :func:`find_checkpoint` picks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from drpo_megatron.errors import CheckpointError
from drpo_megatron.models.megatron_model import unwrap_model
from drpo_megatron.models.safe_state import (check_dcp_metadata, load_plain, plain_rng_states,
                                             restore_rng_states)

__all__ = ["save_megatron_checkpoint", "load_megatron_checkpoint", "find_checkpoint",
           "load_trainer_state", "read_trainer_state", "rng_states", "set_rng_states"]

# fully_reshardable: the optimizer state loads under another TP/PP/DP layout;
# chained_optim_avoid_prefix: the key layout of Megatron's current checkpoints.
_OPTIM_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                        "chained_optim_avoid_prefix": True}


def _sharded_model_state(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    # The bare GPTModel's keys: independent of DDP / Float16Module wrapping.
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_megatron_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    out_dir: str | os.PathLike,
    *,
    step: int = 0,
    extra_state: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save model (+ optimizer when given) with ``dist_checkpointing`` (torch_dist format).

    ``extra_state``: a dict of tensors and plain Python types (it is loaded with
    ``weights_only=True``: data cursor, config ...) that rank 0
    writes as ``trainer_state.pt`` into the same directory before it becomes visible; each rank
    also writes its own RNG states (``rng_rank<R>.pt``, see :func:`rng_states`).  The directory
    appears atomically: written as ``<out_dir>.tmp``, the previous checkpoint is moved to
    ``<out_dir>.old`` and the new one renamed into place (a kill at any point leaves a complete
    checkpoint at ``out_dir`` or ``out_dir.old``; :func:`find_checkpoint` picks it).

    Collective.  The optimizer state is saved ``fully_reshardable``: the checkpoint loads
    under another TP/PP/DP layout.  (Megatron keeps expert params in a separate chained
    optimizer only when EP > 1, so optimizer state does not move between EP=1 and EP>1; the
    model part does.)  Writes ``<out_dir>/`` (replaced atomically by rank 0).
    """
    import torch.distributed as dist

    out = Path(out_dir).resolve()
    tmp = out.with_name(out.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    try:
        return _save(model_chunks, optimizer, out, tmp, rank0, step, extra_state)
    except Exception as e:  # noqa: BLE001 - a full disk, a read-only directory (torch_dist wraps
        # the OSError in its own exception types): the previous checkpoint stays intact
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = find_checkpoint(out)
        why = (getattr(e, "strerror", None) or str(e).splitlines()[0]) if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {out} ({why}); "
            f"{'the previous one is intact at ' + str(kept) if kept else 'no earlier checkpoint exists'}"
            "; fix: free disk space or make the directory writable, then resume") from e


def _save(model_chunks, optimizer, out: Path, tmp: Path, rank0: bool, step: int,
          extra_state: Optional[Dict[str, Any]]) -> Path:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    state = _sharded_model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata=_OPTIM_CKPT_METADATA)
    state["step"] = step
    dist_checkpointing.save(state, str(tmp))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(plain_rng_states(rng_states()), tmp / f"rng_rank{rank}.pt")  # weights_only-loadable
    if rank0 and extra_state is not None:
        torch.save(dict(extra_state, step=step), tmp / "trainer_state.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        old = out.with_name(out.name + ".old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return out


def find_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint at ``ckpt_dir`` (or its ``.old`` copy left by a save that was
    killed between the two renames), None when there is none."""
    out = Path(ckpt_dir).resolve()
    for cand in (out, out.with_name(out.name + ".old")):
        if (cand / "metadata.json").exists():
            return cand
    return None


def rng_states() -> Dict[str, Any]:
    """Every RNG a training step may draw from on this rank (python, numpy, torch CPU/CUDA and
    Megatron's model-parallel tracker)."""
    import random

    import numpy as np

    states: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised: nothing to restore
        pass
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "tracker" in states:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(states["tracker"])


def load_trainer_state(ckpt_dir: str | os.PathLike) -> Dict[str, Any]:
    """This rank's RNG states restored, and the ``extra_state`` saved with the checkpoint
    (``{}`` when none was saved)."""
    import torch.distributed as dist

    d = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = d / f"rng_rank{rank}.pt"
    try:
        if rng.exists():
            # tensors and plain types only: a crafted pickle is refused (models/safe_state.py)
            set_rng_states(restore_rng_states(load_plain(rng)))
        return read_trainer_state(d)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError ... of a damaged file
        raise CheckpointError(unreadable(d, e)) from e


def read_trainer_state(ckpt_dir: str | os.PathLike) -> Dict[str, Any]:
    """The ``extra_state`` saved with a checkpoint (``{}`` when none was), without touching the
    model: what a resume checks before building anything."""
    extra = Path(ckpt_dir) / "trainer_state.pt"
    if not extra.exists():
        return {}
    try:
        return load_plain(extra)
    except CheckpointError:  # a crafted pickle (models/safe_state.py): its own message
        raise
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError ... of a damaged file
        raise CheckpointError(unreadable(Path(ckpt_dir), e)) from e


def unreadable(ckpt_dir: str | os.PathLike, e: BaseException) -> str:
    d = Path(ckpt_dir)
    old = d.with_name(d.name + ".old")
    alt = (f"an older complete checkpoint is at {old}: move {d} away to resume from it, or "
           if (old / "metadata.json").exists() else "")
    why = str(e).splitlines()[0] if str(e) else "truncated"
    return (f"the checkpoint {d} cannot be read ({type(e).__name__}: {why}); {alt}start a new run "
            "with another --output-dir (or `drpo train ... --set train.resume=never`)")


def load_megatron_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    ckpt_dir: str | os.PathLike,
) -> int:
    """Load a :func:`save_megatron_checkpoint` directory (any parallel layout); returns step."""
    from megatron.core import dist_checkpointing

    check_dcp_metadata(ckpt_dir)  # torch reads .metadata with pickle.load: vet it first
    chunks = list(model_chunks)
    state = _sharded_model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True,
            metadata=_OPTIM_CKPT_METADATA)
    state["step"] = 0
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(state, str(ckpt_dir), strict="log_unexpected")
    except Exception as e:  # noqa: BLE001 - torch_dist raises many kinds for a damaged directory
        raise CheckpointError(unreadable(ckpt_dir, e)) from e
    if len(chunks) == 1:
        unwrap_model(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(chunks):
            unwrap_model(c).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded.get("step", 0))
