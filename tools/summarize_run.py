#!/usr/bin/env python
"""Print a run's reward curve as a markdown table (used for docs/embedded-default.md).

    .venv/bin/python tools/summarize_run.py runs/embedded-cpu-drpo [--every 10]

Columns: step window, mean rollout reward over the window, held-out eval accuracy at the window's
end (when evaluated), mean |log pi - log mu|, mean step time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    rows = [json.loads(l) for l in (Path(a.run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], {}).update({k: v for k, v in r.items() if v is not None})
    steps = sorted(s for s in by_step if s >= 1)
    ev0 = by_step.get(0, {}).get("eval/accuracy")
    print("| steps | rollout reward (mean) | eval accuracy (avg@k) | mismatch/logprob_abs_diff | step time (s) |")
    print("|---|---|---|---|---|")
    if ev0 is not None:
        print(f"| 0 (before training) | | {ev0:.3f} | | |")
    for i in range(0, len(steps), a.every):
        win = [by_step[s] for s in steps[i:i + a.every]]

        def mean(key, win=win):
            vals = [w[key] for w in win if key in w and isinstance(w[key], (int, float))]
            return sum(vals) / len(vals) if vals else math.nan

        ev = win[-1].get("eval/accuracy")
        print(f"| {steps[i]}-{steps[min(i + a.every, len(steps)) - 1]} | {mean('rollout/reward_mean'):.3f} | "
              f"{'' if ev is None else f'{ev:.3f}'} | {mean('mismatch/logprob_abs_diff'):.2e} | "
              f"{mean('perf/step_time_s'):.2f} |")


if __name__ == "__main__":
    main()
