#!/usr/bin/env python
"""Routing replay (R3) overhead: step time with ``rollout.routing_replay`` replay / record vs off,
and the bytes per token the routes take.

Two measurements:

* ``loop`` (default): ``drpo train`` on the embedded default (tiny Qwen3-MoE, 16 prompts x 8
  samples, one SGLang CPU server) for ``--steps`` steps per run, runs interleaved off / replay /
  record, ``--reps`` times each (in a shuffled order per repetition).  Per run: the median over
  steps 2.. of ``perf/step_time_s``, ``perf/rollout_time_s`` (generation, where the engine
  returns the routes) and ``perf/train_time_s`` (mismatch forward + updates, where they are
  replayed); the ratio of a mode is the median over repetitions of mode / off of the same
  repetition.  Bytes per token: ``rollouts.jsonl`` size per sampled token (replay - off), and
  the routes' own size (stored uint8 L x K, base64 in rollouts.jsonl, SGLang's wire).
* ``actor``: the Megatron actor alone on fixed samples of the embedded default's shape with
  synthetic routes, off / record / replay actors built in one process, repetitions interleaved
  (``compute_logprobs`` + ``train_on``): the trainer-side overhead without rollout noise.

    OMP_NUM_THREADS=1 python bench/bench_routing_replay.py [--what loop|actor|both] [--reps 2]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("off", "replay", "record")


def _median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------- the loop
def run_loop(mode: str, out: Path, steps: int) -> dict:
    import yaml

    cfg = {"train": {"max_steps": steps, "eval_every": 0, "save_every": 0},
           "rollout": {"routing_replay": mode}, "logging": {"writers": ["jsonl"]}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, "-m", "drpo_megatron.cli", "train", "--config", str(path),
                    "--output-dir", str(out)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=3600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) >= 2]
    rollouts = (out / "rollouts.jsonl").read_text().splitlines()
    tokens = sum(len(json.loads(line)["response_ids"]) for line in rollouts)
    routed = [json.loads(line).get("routed_experts") for line in rollouts]
    res = {k: _median([r[f"perf/{k}"] for r in rows])
           for k in ("step_time_s", "rollout_time_s", "train_time_s")}
    res["jsonl_bytes_per_sampled_token"] = (out / "rollouts.jsonl").stat().st_size / tokens
    if routed[0] is not None:
        fwd = sum(r["shape"][0] for r in routed)
        res["route_b64_bytes_per_forwarded_token"] = sum(len(r["b64"]) for r in routed) / fwd
        res["route_raw_bytes_per_forwarded_token"] = routed[0]["shape"][1] * routed[0]["shape"][2] * (
            1 if routed[0]["dtype"] == "uint8" else 2)
    return res


def bench_loop(reps: int, steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    per: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-r3-") as tmp:
        for rep in range(reps):
            order = list(MODES)
            rng.shuffle(order)
            for mode in order:
                t0 = time.time()
                per[mode].append(run_loop(mode, Path(tmp) / f"{mode}-{rep}", steps))
                print(f"rep {rep} {mode}: {per[mode][-1]} ({time.time() - t0:.0f}s)", flush=True)
    out = {}
    for mode in MODES:
        out[mode] = {k: _median([r[k] for r in per[mode]]) for k in per[mode][0]}
        for k in ("step_time_s", "rollout_time_s", "train_time_s"):
            out[mode][f"{k}_ratio"] = _median([a[k] / b[k] for a, b in zip(per[mode], per["off"])])
    return out


# ---------------------------------------------------------------------------- the actor
def bench_actor(reps: int, seed: int) -> dict:
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import numpy as np
    import torch

    from drpo_megatron.config import ModelConfig, ParallelConfig, RunConfig, TaskConfig
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.models.tiny import ensure_tiny_checkpoint
    from drpo_megatron.samples import RoutedExperts, Sample
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.config import ActorConfig

    run = RunConfig()
    m = ModelConfig()
    policy = ensure_tiny_checkpoint(m.cache_dir, m.tiny, max_operand=TaskConfig().max_operand,
                                    show_progress=False)
    g = torch.Generator().manual_seed(seed)
    n = run.rollout.prompts_per_step * run.rollout.samples_per_prompt
    samples = []
    for i in range(n):  # the embedded default's shape: ~33-token prompts, <= 16 new tokens
        p, r = 33, 4 + int(torch.randint(0, 13, (1,), generator=g))
        ids = torch.randint(3, 128, (p + r,), generator=g).tolist()
        routes = np.stack([np.stack([torch.randperm(m.tiny.num_experts, generator=g)[
            :m.tiny.top_k].numpy() for _ in range(m.tiny.num_layers)]) for _ in range(p + r - 1)])
        samples.append(Sample(group_id=i // run.rollout.samples_per_prompt, prompt_ids=ids[:p],
                              response_ids=ids[p:], rollout_logp=[-1.0] * r, text="",
                              finish_reason="stop", weight_version="0",
                              advantage=float(torch.randn(1, generator=g)),
                              routed_experts=RoutedExperts.from_array(routes)))
    mm.init_distributed()
    actors = {mode: MegatronActor(ActorConfig(
        hf_path=str(policy), model=run.model, optim=run.optim, loss=run.loss,
        parallel=ParallelConfig(use_distributed_optimizer=False), routing_replay=mode))
        for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    rng = random.Random(seed)
    for rep in range(reps + 1):
        order = list(MODES)
        rng.shuffle(order)
        for mode in order:
            a = actors[mode]
            t0 = time.process_time()
            a.compute_logprobs(samples)
            a.train_on(samples)
            if rep:  # the first repetition warms up
                times[mode].append(time.process_time() - t0)
    return {mode: {"seconds": _median(times[mode]),
                   "ratio": _median([x / y for x, y in zip(times[mode], times["off"])])}
            for mode in MODES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("loop", "actor", "both"), default="both")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="RL steps per loop run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res: dict = {}
    if args.what in ("actor", "both"):
        res["actor"] = bench_actor(max(args.reps, 3), args.seed)
        print(json.dumps({"actor": res["actor"]}, indent=1), flush=True)
    if args.what in ("loop", "both"):
        res["loop"] = bench_loop(args.reps, args.steps, args.seed)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
