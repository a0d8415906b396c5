#!/usr/bin/env python
"""Time and peak memory of every policy loss (forward + backward) on 1M tokens.

Each measurement is one call of the loss (including its metrics), ``token-mean`` aggregation
and ``backward()``. Results are printed as ratios to ``pg_is`` measured in the same run:
repetitions are interleaved (every repetition runs every loss once, in a shuffled order) and the
time ratio is the median over repetitions of loss_time / pg_is_time of that repetition, so slow
phases of a noisy machine hit both sides of a ratio.

Peak memory = the peak extra memory during the call above the inputs:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: process peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS
  before the call, with glibc forced to serve allocations >= 64 KiB by mmap (``mallopt``) so that
  freed tensors leave the RSS at once. Tensors are 4 MB each at 1M tokens, so this is exact to a
  few pages.
CPU timings are process CPU time, with glibc's heap trimming off (see ``main``), the CPU analogue
of the CUDA caching allocator; otherwise every fresh tensor pays page faults and the noise swamps
the ratios. Memory is measured afterwards, in a fresh child process on CPU.

    OMP_NUM_THREADS=1 python bench/bench_losses.py [--tokens 1000000] [--reps 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from drpo_megatron.algorithms import POLICY_LOSSES, aggregate_loss  # noqa: E402

SEQ_LEN = 1024   # packed sequences of this many tokens (GSPO needs sequence ids)
TOP_K = 20       # DPPO top-K default
PAD_FRAC = 0.02  # masked tokens


def make_inputs(T: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mu_logp = torch.log(torch.rand(T, generator=g) * 0.98 + 0.01)
    logp = mu_logp + 0.05 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) > PAD_FRAC
    seq_ids = torch.arange(T) // SEQ_LEN
    topk_logp = torch.log_softmax(torch.randn(T, TOP_K, generator=g) * 2, -1)
    topk_pol = torch.log_softmax(topk_logp + 0.05 * torch.randn(T, TOP_K, generator=g), -1)
    in_topk = torch.rand(T, generator=g) < 0.9
    d = dict(logp=logp, mu_logp=mu_logp, adv=adv, mask=mask, seq_ids=seq_ids,
             topk_logp=topk_logp, topk_logp_policy=topk_pol, sampled_in_topk=in_topk)
    return {k: v.to(device) for k, v in d.items()}


def extras_for(name: str, inp: dict) -> dict:
    if name == "gspo":
        return {"seq_ids": inp["seq_ids"]}
    if name.startswith("dppo_topk"):
        return {k: inp[k] for k in ("topk_logp", "topk_logp_policy", "sampled_in_topk")}
    return {}


def step(name: str, inp: dict, extra: dict) -> None:
    lp = inp["logp"].detach().requires_grad_(True)
    loss, metrics = POLICY_LOSSES[name](lp, inp["mu_logp"], inp["adv"], inp["mask"], None,
                                        **extra)
    aggregate_loss(loss, inp["mask"], "token-mean").backward()
    # metrics are part of the cost: read them (as a trainer logging them would)
    torch.stack([v.float() for v in metrics.values()]).sum().item()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_bytes(name: str, inp: dict, device: str) -> int:
    extra = extras_for(name, inp)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(name, inp, extra)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    step(name, inp, extra)
    return (_rss_kib("VmHWM") - base) * 1024


def measure_memory(names: list[str], tokens: int, device: str) -> dict[str, int]:
    if device.startswith("cuda"):
        inp = make_inputs(tokens, device)
        for n in names:
            step(n, inp, extras_for(n, inp))
        return {n: peak_bytes(n, inp, device) for n in names}
    # CPU: a fresh process whose glibc serves every allocation >= 64 KiB by mmap, so that RSS
    # tracks the live tensors exactly (freed tensors are unmapped at once).
    cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(tokens), "--device", device,
           "--losses", ",".join(names), "--memory-child"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--losses", default=",".join(POLICY_LOSSES),
                    help="comma-separated subset (pg_is is always included)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = ["pg_is"] + [n for n in args.losses.split(",") if n and n != "pg_is"]
    cpu = not args.device.startswith("cuda")

    if args.memory_child:
        mallopt(M_MMAP_THRESHOLD, 64 << 10)
        inp = make_inputs(args.tokens, args.device)
        for n in names:
            step(n, inp, extras_for(n, inp))
        print(json.dumps({n: peak_bytes(n, inp, args.device) for n in names}))
        return

    if cpu:
        # Time with a caching heap, as the CUDA caching allocator gives on GPU: freed memory stays
        # mapped (no trimming; mmap only above 32 MiB), so the timings measure the losses'
        # arithmetic rather than the kernel's page faults on every fresh 4 MB tensor (those made
        # repeated runs differ by 2x here).
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    # CPU: process CPU time (robust on a shared machine: time spent descheduled is not counted).
    # CUDA: wall time around synchronized calls.
    clock = time.process_time if cpu else time.perf_counter

    inp = make_inputs(args.tokens, args.device)
    extras = {n: extras_for(n, inp) for n in names}
    for _ in range(2):  # warm-up (and let the heap grow to its working size)
        for n in names:
            step(n, inp, extras[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(args.reps):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            _sync(args.device)
            t0 = clock()
            step(n, inp, extras[n])
            _sync(args.device)
            times[n].append(clock() - t0)
    del inp, extras
    mem = measure_memory(names, args.tokens, args.device)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    kind = "CPU time" if cpu else "wall time"
    print(f"policy losses, forward+backward (+metrics, token-mean), {args.tokens:,} tokens fp32, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.reps} interleaved reps ({kind}), commit {commit}")
    print("| loss | median ms | time / pg_is | peak MiB | memory / pg_is |")
    print("|---|---:|---:|---:|---:|")
    ratios = {}
    for n in names:
        ratios[n] = statistics.median(t / b for t, b in zip(times[n], times["pg_is"]))
        print(f"| {n} | {1e3 * statistics.median(times[n]):.1f} | {ratios[n]:.2f} | "
              f"{mem[n] / 2**20:.1f} | {mem[n] / max(mem['pg_is'], 1):.2f} |")
    if "drpo" in names:
        verdict = "OK" if ratios["drpo"] <= 1.3 else "OVER BUDGET"
        print(f"drpo time ratio {ratios['drpo']:.2f} (budget 1.3): {verdict}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "tokens": args.tokens, "reps": args.reps,
                       "rows": [{"loss": n, "median_ms": 1e3 * statistics.median(times[n]),
                                 "time_vs_pg_is": ratios[n], "peak_mib": mem[n] / 2**20,
                                 "memory_vs_pg_is": mem[n] / max(mem["pg_is"], 1)} for n in names]},
                      fh, indent=1)


if __name__ == "__main__":
    main()
