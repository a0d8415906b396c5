"""The real loop with the in-place transports and ``rollout.verify_sync`` on: after every push the
server's greedy probe log-probs equal the Megatron actor's own forward (MegatronActor
.named_hf_tensors -> SGLang, checked against MegatronActor.compute_logprobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

STEPS = 2


@pytest.mark.parametrize("transport,precision,atol,num_servers", [
    pytest.param("tensor", "bf16", 0.15, 1, marks=pytest.mark.extended),  # tensor: test_transport_e2e
    ("distributed", "fp8_emulated", 0.5, 1),
    # two servers: test_router.py (pushes to both); the distributed transport: the case above
    pytest.param("distributed", "bf16", 0.15, 2, marks=pytest.mark.extended)])
def test_run_with_verified_sync(transport, precision, atol, num_servers, tmp_path):
    cfg = {
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
                    "weight_transport": transport, "precision": precision,
                    "weight_bucket_mb": 0.5, "verify_sync": True, "num_servers": num_servers,
                    "router": "client"},
        "loss": {"horizon": 8},
        "optim": {"updates_per_rollout": 1},
        "train": {"max_steps": STEPS, "eval_every": 0},
        "logging": {"writers": ["jsonl"]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config",
                           str(tmp_path / "cfg.yaml"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if m["step"] >= 1]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        assert 0 <= m["sync/probe_max_logprob_diff"] <= atol, m
        assert m["perf/weight_sync_time_s"] > 0 and m["perf/weight_sync_buckets"] >= 1
    log = (out / "logs" / "trainer.log").read_text()
    for i in range(num_servers):  # every server probed after every push
        assert f"weight sync check: sglang-{i} at version {STEPS}" in log
    print({m["step"]: m["sync/probe_max_logprob_diff"] for m in steps})
