"""``parallel.recompute`` reaches Megatron-Core: the TransformerConfig fields per mode, and on the
real model (Megatron-Core on gloo, one process, tiny Qwen3-MoE) the loss and every gradient are
unchanged by selective / full recompute, the recompute really happens (forward calls counted in
backward), and the peak activation memory drops none > selective > full (bench/bench_recompute.py,
torch profiler memory timeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_recompute_fields_per_mode():
    from drpo_megatron.models.megatron_model import recompute_fields

    assert recompute_fields("none")["recompute_granularity"] is None
    sel = recompute_fields("selective")
    assert sel["recompute_granularity"] == "selective" and sel["recompute_modules"] == ["core_attn"]
    assert sel["recompute_num_layers"] is None  # Megatron requires None with selective
    full = recompute_fields("full")
    assert (full["recompute_granularity"], full["recompute_method"],
            full["recompute_num_layers"]) == ("full", "uniform", 1)
    with pytest.raises(ValueError, match=r"parallel.recompute='partial'.*none"):
        recompute_fields("partial")


def test_recompute_fields_are_megatron_valid():
    """Each mode's fields pass TransformerConfig's own validation (__post_init__)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from drpo_megatron.models.megatron_model import recompute_fields

    for mode in ("none", "selective", "full"):
        cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                                **recompute_fields(mode))
        assert cfg.recompute_granularity == (None if mode == "none" else mode)


@pytest.mark.slow
def test_recompute_same_gradients_less_memory(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("sized for the CPU path")
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_recompute.py"), "--check",
                        "--layers", "2", "--hidden", "64", "--seq", "64", "--batch", "2",
                        "--vocab", "128", "--moe-ffn", "32", "--reps", "1", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["none"]["n_grads"] > 10
    for mode in ("selective", "full"):
        assert rows[mode]["loss"] == rows["none"]["loss"]
        assert rows[mode]["max_rel_grad_diff"] <= 1e-5
    assert rows["full"]["layer0_calls"] == 2 and rows["selective"]["core_attention0_calls"] == 2
    assert rows["full"]["peak_activation_mib"] < rows["selective"]["peak_activation_mib"] \
        < rows["none"]["peak_activation_mib"]
