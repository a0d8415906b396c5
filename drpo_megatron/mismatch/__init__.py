"""Training-vs-inference mismatch monitor: metrics (pure torch) and metric writers.

    from drpo_megatron.mismatch import compute_mismatch_metrics, mismatch_histogram_tensors
    from drpo_megatron.mismatch import build_writers

    writers = build_writers(["jsonl", "tensorboard"], run_dir)        # rank 0 only
    m = compute_mismatch_metrics(logp, rollout_logp, mask, seq_ids=seq, advantages=adv)
    writers.log_scalars(step, {**m, **loss_metrics})
    writers.log_histograms(step, mismatch_histogram_tensors(logp, rollout_logp, mask,
                                                            advantages=adv))

Attributes are imported lazily so that ``catalog`` (pure Python) does not pull in torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "compute_mismatch_metrics": "metrics",
    "mismatch_histogram_tensors": "metrics",
    "LOG_RATIO_CLAMP": "metrics",
    "MU_BIN_EDGES": "metrics",
    "MU_BIN_LABELS": "metrics",
    "POSITION_LABELS": "metrics",
    "MetricWriter": "writers",
    "JsonlWriter": "writers",
    "TensorBoardWriter": "writers",
    "WandbWriter": "writers",
    "MultiWriter": "writers",
    "WRITERS": "writers",
    "build_writers": "writers",
    "summarize_histogram": "histograms",
    "METRICS": "catalog",
    "MetricSpec": "catalog",
    "spec_for": "catalog",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
