"""Synthetic run directories for dashboard tests (no trainer needed).

Each run is written through the real writers: per step, synthetic trainer / rollout log-probs
go through ``compute_mismatch_metrics`` and ``mismatch_histogram_tensors`` and then into
``JsonlWriter`` (metrics.jsonl + histograms.jsonl), next to loss / reward / perf scalars.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _run_configs import resolved_config

from drpo_megatron.mismatch import compute_mismatch_metrics, mismatch_histogram_tensors
from drpo_megatron.mismatch.writers import JsonlWriter

QWEN = "/models/Qwen/Qwen3-30B-A3B-Base"
# name -> (config, log-prob noise std, rollout seconds per step)
RUNS = {
    "bf16": (resolved_config("bf16", hf_path=QWEN, dtype="bf16"), 0.01, 6.0),
    "fp8-rollout": (resolved_config("fp8-rollout", hf_path=QWEN, dtype="bf16", precision="fp8"),
                    0.06, 4.0),
    "fp8-e2e": (resolved_config("fp8-e2e", hf_path=QWEN, dtype="bf16", fp8="blockwise",
                                precision="fp8", params={"delta": 0.5}), 0.035, 4.0),
}


def make_run(root: Path, key: str, steps: int = 12, tokens: int = 256, seed: int = 0,
             with_hist: bool = True) -> Path:
    import yaml

    cfg, noise, rollout_s = RUNS[key]
    d = root / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    g = torch.Generator().manual_seed(seed)
    w = JsonlWriter(d)
    delta = float(cfg["loss"].get("params", {}).get("delta", 12.5))
    for step in range(steps):
        mu = torch.rand(tokens, generator=g).clamp_min(1e-6) ** 3  # many low-mu tokens
        rollout_logp = mu.log()
        logp = (rollout_logp + noise * (1 + 0.02 * step) * torch.randn(tokens, generator=g)).clamp(max=0)
        seq = torch.arange(tokens) // 32
        adv = torch.where(seq % 2 == 0, 1.0, -1.0)
        mask = torch.ones(tokens, dtype=torch.bool)
        m = compute_mismatch_metrics(logp, rollout_logp, mask, seq_ids=seq, advantages=adv,
                                     delta=delta)
        m.update({
            "loss/total": 0.5 * math.exp(-step / 8) + 0.01 * (hash(key) % 7),
            "loss/policy": 0.4 * math.exp(-step / 8),
            "rollout/reward_mean": 0.2 + 0.5 * (1 - math.exp(-step / 6)) - noise,
            "perf/rollout_time_s": rollout_s,
            "perf/train_time_s": 3.0,
            "perf/weight_sync_time_s": 0.8,
            "perf/step_time_s": rollout_s + 3.0 + 0.8 + 0.4,
        })
        if step == 3:
            m["loss/total"] = float("nan")  # NaN must be tolerated
        w.log_scalars(step, m)
        if with_hist:
            w.log_histograms(step, mismatch_histogram_tensors(logp, rollout_logp, mask,
                                                              advantages=adv, delta=delta))
    w.close()
    return d


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root, k, seed=i) for i, k in enumerate(RUNS)]
