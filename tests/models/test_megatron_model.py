"""drpo_megatron.models.megatron_model: distributed init, bridge load, optimizer, export, ckpts.

Runs the real Megatron-Core + megatron-bridge stack in one subprocess (on CPU through the
platform layer) on a tiny Qwen3-MoE checkpoint created here, and checks the API contract.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from subprocess_util import run_python

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAKE_HF = ROOT / "tests" / "platform" / "megatron_dist_worker.py"
WORKER = HERE / "megatron_model_worker.py"


def _run(args, timeout):
    run_python(args, timeout)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("sized for the CPU path (local layer spec)")
    d = tmp_path_factory.mktemp("megatron_model")
    _run([MAKE_HF, "make-hf", d / "hf"], timeout=180)
    out = d / "work" / "out.json"
    out.parent.mkdir()
    _run([WORKER, d / "hf", out], timeout=400)
    return json.loads(out.read_text())


def test_init_distributed(api):
    assert api["init"] == {"rank": 0, "world_size": 1, "tp": 1, "pp": 1, "ep": 1, "dp": 1}
    assert api["init_again"] == api["init"]
    assert "already initialised" in api["init_mismatch_error"]
    assert api["dp_world"] == 1
    assert api["destroyed"] and api["reinit"]["world_size"] == 1


def test_load_policy_from_hf(api):
    assert api["chunks"] == 1 and api["wrapper"] == "DistributedDataParallel"
    assert api["vocab_size"] == 128
    assert api["cpu_overrides_applied"] == {"use_cpu_initialization": True, "moe_grouped_gemm": False,
                                            "add_bias_linear": False,
                                            "gradient_accumulation_fusion": False}


def test_forward_contract(api):
    assert api["mask"] == {"shape": [1, 1, 10, 10], "dtype": "torch.bool", "masked_above_diagonal": True}
    assert api["logits"] == {"shape": [3, 10, 128], "dtype": "torch.float32"}  # [B, S, V]
    assert api["hidden_shape"] == [10, 3, 64]  # [S, B, H]
    assert api["per_token_loss_shape"] == [3, 10]  # labels given: per-token CE [B, S]
    assert api["labels_loss_vs_ce"] < 1e-5


def test_build_optimizer_trains(api):
    assert "use_distributed_optimizer=True" in api["opt_mismatch_error"]
    losses = api["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    bf16 = api["bf16_losses"]
    assert api["bf16_param_dtype"] == "torch.bfloat16" and api["bf16_logits_dtype"] == "torch.float32"
    assert bf16[-1] < bf16[0] and bf16 == pytest.approx(losses[:3], abs=0.05)


def test_export_and_save_hf(api):
    assert api["export_names_equal"] and api["export_changed"] == 45
    assert api["export_dtypes"] == ["torch.float32"]
    assert {"config.json", "model.safetensors"} <= set(api["saved_files"])
    assert "stale.txt" not in api["saved_files"] and api["leftovers"] == []
    assert api["saved_equals_export"]
    assert api["hf_reload_logits_diff"] < 1e-5


def test_megatron_checkpoint_resume(api):
    assert api["loaded_step"] == 4
    assert api["resumed"] == pytest.approx(api["continued"], rel=1e-6)
