"""Checkpoint state loads without running code (models/safe_state.py): a crafted pickle in
``trainer_state.pt``, ``rng_rank<R>.pt`` or the torch_dist ``.metadata`` is refused before it can
run anything; what drpo writes (and RNG files written before the change) still loads."""

from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from drpo_megatron.training import checkpoint as mm
from drpo_megatron.models.safe_state import (UnsafeCheckpointError, check_dcp_metadata,
                                             load_plain, plain_rng_states, restore_rng_states)


class Payload:
    """Unpickling this runs ``touch <canary>`` (what a crafted checkpoint would do)."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_crafted_trainer_state_and_rng_files_are_refused(tmp_path):
    canary = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"cursor": 3, "order": [1, 2], "step": 3, "x": Payload(canary)},
               ckpt / "trainer_state.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state.pt: refusing to load it.*"
                                                    r"GLOBAL posix.system"):
        mm.load_trainer_state(ckpt)
    (ckpt / "trainer_state.pt").unlink()
    torch.save({"python": random.getstate(), "torch": Payload(canary)}, ckpt / "rng_rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"rng_rank0.pt: refusing to load it"):
        mm.load_trainer_state(ckpt)
    assert not canary.exists()
    # what torch.load(weights_only=False), the old code, did with the same file
    torch.load(ckpt / "rng_rank0.pt", weights_only=False)
    assert canary.exists()


def test_crafted_dcp_metadata_is_refused_before_torch_reads_it(tmp_path):
    canary = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(canary)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load it: it asks "
                                                    r"for the global posix.system"):
        mm.load_megatron_checkpoint([], None, ckpt)  # the check comes before anything else
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UnsafeCheckpointError, match="cannot be read as checkpoint metadata"):
        check_dcp_metadata(ckpt)
    assert not canary.exists()


def test_real_dcp_metadata_passes(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "extra": io.BytesIO(b"x"),
             "h": torch.ones(2, dtype=torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    check_dcp_metadata(tmp_path)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in the numpy state
    torch.save(plain_rng_states(mm.rng_states()), tmp_path / "rng.pt")
    want = _draws()
    mm.set_rng_states(restore_rng_states(load_plain(tmp_path / "rng.pt")))
    assert _draws() == want


def test_legacy_rng_file_with_a_numpy_array_still_loads(tmp_path):
    np.random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, tmp_path / "rng.pt")  # the format before
    want = _draws()
    mm.set_rng_states(restore_rng_states(load_plain(tmp_path / "rng.pt")))
    assert _draws() == want
