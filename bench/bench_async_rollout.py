#!/usr/bin/env python
"""Asynchronous rollouts: step time of ``rollout.mode: async`` vs ``sync`` on the embedded default.

``drpo train`` on the embedded default (tiny Qwen3-MoE, 16 prompts x 8 samples, one SGLang CPU
server, same seed, same number of samples) for ``--steps`` steps per run; modes run interleaved
(a shuffled order per repetition), ``--reps`` times each:

* ``sync``: generate -> train -> push, one after the other;
* ``async``: ``max_staleness: 1`` (the producer generates the next batch while the trainer
  trains; a push aborts the requests in flight, which are generated again on the new weights);
* ``async_partial``: the same with ``partial_rollouts: true`` (cut responses continue).

Per run, medians over steps 3.. (steady state) of ``perf/step_time_s``, of the sync run's
``perf/rollout_time_s + perf/reward_time_s`` (R: what the producer does per batch) and
``perf/train_time_s + perf/weight_sync_time_s`` (T + S: what the trainer does per step).
Printed, per repetition and as the median over repetitions:

* ``async / sync`` step time;
* ``async / max(R, T + S)`` of the sync run of the same repetition: the ideal overlap is 1.0
  (issue target: at most 1.15).

Also ``perf/trainer_wait_s`` and ``perf/engine_idle_frac`` of each mode.  Both sides share the
2 CPU cores, so "ideal overlap" on this machine is bounded by compute, not by scheduling: the
note in docs/benchmarks.md says how to read it.

    OMP_NUM_THREADS=1 python bench/bench_async_rollout.py [--steps 12] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = {
    "sync": {"mode": "sync"},
    "async": {"mode": "async", "max_staleness": 1},
    "async_partial": {"mode": "async", "max_staleness": 1, "partial_rollouts": True},
}
STEADY_FROM = 3  # steps 1-2 include the first batch (nothing to overlap with yet)


def _median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def run(mode: str, out: Path, steps: int, seed: int) -> dict:
    import yaml

    cfg = {"train": {"max_steps": steps, "eval_every": 0, "save_every": 0, "seed": seed},
           "rollout": MODES[mode], "logging": {"writers": ["jsonl"]}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(path),
                    "--output-dir", str(out)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=3600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) >= STEADY_FROM and "perf/step_time_s" in r]

    def med(*keys):
        return _median([sum(r.get(k, 0.0) for k in keys) for r in rows])

    return {"step": med("perf/step_time_s"),
            "R": med("perf/rollout_time_s", "perf/reward_time_s"),
            "TS": med("perf/train_time_s", "perf/weight_sync_time_s"),
            "wait": med("perf/trainer_wait_s"), "idle": med("perf/engine_idle_frac"),
            "staleness": med("rollout/staleness_mean"),
            "samples": sum(r.get("rollout/num_samples", 0.0) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(0)
    reps = []
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        for rep in range(args.reps):
            order = list(MODES)
            rng.shuffle(order)
            res = {m: run(m, Path(tmp) / f"{m}_{rep}", args.steps, args.seed) for m in order}
            reps.append(res)
            s = res["sync"]
            ideal = max(s["R"], s["TS"])
            print(f"rep {rep} (order {order}): sync step {s['step']:.3f}s = R {s['R']:.3f}s + "
                  f"T+S {s['TS']:.3f}s; max(R, T+S) {ideal:.3f}s")
            for m in ("async", "async_partial"):
                a = res[m]
                print(f"  {m:14s} step {a['step']:.3f}s  /sync {a['step'] / s['step']:.3f}  "
                      f"/max(R,T+S) {a['step'] / ideal:.3f}  trainer_wait {a['wait']:.3f}s  "
                      f"engine_idle {a['idle']:.2f}  staleness {a['staleness']:.2f}  "
                      f"samples {a['samples']:.0f} (sync {s['samples']:.0f})")
    print("\nmedian over repetitions:")
    for m in ("async", "async_partial"):
        vs_sync = _median([r[m]["step"] / r["sync"]["step"] for r in reps])
        vs_ideal = _median([r[m]["step"] / max(r["sync"]["R"], r["sync"]["TS"]) for r in reps])
        print(f"  {m:14s} async/sync {vs_sync:.3f}   async/max(R, T+S) {vs_ideal:.3f} "
              f"(target <= 1.15)")


if __name__ == "__main__":
    main()
