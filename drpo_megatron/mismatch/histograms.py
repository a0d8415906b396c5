"""Compact per-step histogram summaries (for ``RUN_DIR/histograms.jsonl`` and the dashboard).

One summary per tensor, a JSON-ready dict:

    {"n": finite count, "nonfinite": dropped count, "min", "max", "mean", "std",
     "quantiles": {"0.01": v, "0.05": v, "0.25": v, "0.5": v, "0.75": v, "0.95": v, "0.99": v},
     "scale": "linear" | "log", "edges": [bins + 1 floats], "counts": [bins ints],
     "zeros": count of exact zeros (log scale only: they have no place on a log axis)}

Log-spaced bins are used for non-negative data whose positive values span more than
``LOG_SCALE_DYNAMIC_RANGE`` (|log pi - log mu| spans 1e-7..1 in one step); everything else is
binned linearly between min and max.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = ["HISTOGRAM_BINS", "HISTOGRAM_SCALES", "QUANTILES", "summarize_histogram"]

#: Enough bins to show the shape in a ~500 px chart, few enough to keep a jsonl line ~1 KB.
HISTOGRAM_BINS = 40
#: Quantiles stored per step; the dashboard draws 5-95 / 25-75 bands and the median from them.
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Positive values spanning more than three decades get log-spaced bins.
LOG_SCALE_DYNAMIC_RANGE = 1e3
#: Quantiles are computed on an evenly strided subsample above this size (sorting cost);
#: 4M samples put the quantile error far below a histogram bin.
QUANTILE_MAX_SAMPLES = 1 << 22
#: Fixed bin scale for the per-token arrays of ``mismatch_histogram_tensors`` so that every step
#: and every run of one name is binned alike (overlays compare like with like). Other names
#: choose automatically (see module docstring).
HISTOGRAM_SCALES = {
    "mismatch/logprob_abs_diff": "log",
    "mismatch/prob_abs_diff": "log",
    "mismatch/logprob_diff": "linear",
    "mismatch/prob_diff": "linear",
    "mismatch/is_ratio": "linear",
    "mismatch/drpo_weight": "linear",
    "mismatch/rollout_logprob": "linear",
}
#: Digits kept in the JSON (DRPO weights of a BF16 run differ from 1 in the 5th digit).
_SIG_DIGITS = 10


def _r(v: float) -> float:
    return float(f"{float(v):.{_SIG_DIGITS}g}")


@torch.no_grad()
def summarize_histogram(values: Any, bins: int = HISTOGRAM_BINS,
                        scale: Optional[str] = None) -> dict:
    """Summarise a tensor / array of any shape (flattened) into the dict described above.

    ``scale``: "log", "linear" or None (automatic). "log" falls back to linear when the data
    has negative values or no positive value. Non-finite values are dropped and counted. An
    empty (or all non-finite) input gives ``{"n": 0, "nonfinite": k}``.
    """
    if scale not in (None, "log", "linear"):
        raise ValueError(f"scale must be 'log', 'linear' or None, got {scale!r}")
    x = torch.as_tensor(values).detach().flatten().to(device="cpu", dtype=torch.float64)
    fin = torch.isfinite(x)
    nonfinite = int((~fin).sum())
    x = x[fin]
    n = int(x.numel())
    if n == 0:
        return {"n": 0, "nonfinite": nonfinite}
    lo, hi = float(x.min()), float(x.max())
    out: dict = {"n": n, "nonfinite": nonfinite, "min": _r(lo), "max": _r(hi),
                 "mean": _r(x.mean()), "std": _r(x.std(correction=0))}
    xs = x if n <= QUANTILE_MAX_SAMPLES else x[:: math.ceil(n / QUANTILE_MAX_SAMPLES)]
    xs, _ = torch.sort(xs)
    m = xs.numel()
    qs = {}
    for q in QUANTILES:  # linear interpolation between order statistics (numpy's default)
        pos = q * (m - 1)
        i0 = int(math.floor(pos))
        i1 = min(i0 + 1, m - 1)
        qs[str(q)] = _r(xs[i0] + (xs[i1] - xs[i0]) * (pos - i0))
    out["quantiles"] = qs

    pos_vals = x[x > 0]
    if scale is None:
        use_log = (lo >= 0 and pos_vals.numel() > 0
                   and float(pos_vals.max()) > LOG_SCALE_DYNAMIC_RANGE * float(pos_vals.min()))
    else:
        use_log = scale == "log" and lo >= 0 and pos_vals.numel() > 0
    if use_log and float(pos_vals.max()) == float(pos_vals.min()):
        use_log = False  # a single positive value has no log range
    if use_log:
        plo, phi = float(pos_vals.min()), float(pos_vals.max())
        a, b = math.log10(plo), math.log10(phi)
        edges = [10 ** (a + (b - a) * i / bins) for i in range(bins + 1)]
        counts = torch.histc(torch.log10(pos_vals), bins=bins, min=a, max=b)
        out.update(scale="log", zeros=int(n - pos_vals.numel()))
    else:
        if hi == lo:
            w = max(abs(lo) * 1e-3, 1e-9)
            a, b, nb = lo - w, hi + w, 1
        else:
            a, b, nb = lo, hi, bins
        edges = [a + (b - a) * i / nb for i in range(nb + 1)]
        counts = torch.histc(x, bins=nb, min=a, max=b)
        out["scale"] = "linear"
    out["edges"] = [_r(e) for e in edges]
    out["counts"] = [int(c) for c in counts.tolist()]
    return out
