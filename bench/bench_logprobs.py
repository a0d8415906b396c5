#!/usr/bin/env python
"""Chunked vocab-parallel log-probs vs the naive full-vocab path, at Qwen vocab size.

For each token count T (hidden [T, H], LM head [V, H], V = 151,936, H = 2048, fp32, tp = 1):

* ``bare``: the LM-head matmul alone, forward + backward (``(h @ W^T).sum().backward()``: the
  three matmuls any log-prob implementation pays);
* ``naive``: fp32 logits [T, V] -> ``log_softmax`` -> gather, forward + backward;
* ``chunked``: :func:`drpo_megatron.training.logprobs.vocab_parallel_logprobs`, forward +
  backward (logits recomputed per chunk in backward).

Every (method, T) runs in a fresh child process (one small warm-up call, then the measured call):

* time: process CPU time of the call on CPU (1 thread; robust to other jobs on a shared
  machine), synchronized wall clock on CUDA; reported as a ratio to ``bare`` at the same T;
* peak extra memory above the inputs: CPU = peak RSS (``VmHWM``, reset via
  ``/proc/self/clear_refs``) minus the RSS before the call, with glibc serving every allocation
  >= 64 KiB by mmap so freed tensors leave the RSS at once; CUDA = ``max_memory_allocated``.
  Measured twice: ``extra`` = a call with the LM-head weight frozen (gradient w.r.t. the hidden
  states only): the memory the log-prob computation itself needs, the O(T x V) term; ``peak`` =
  the measured call with both gradients, which adds the [V, H] fp32 weight gradient (1.24 GB
  here, the same for every method) and is dominated by it at small T.

    OMP_NUM_THREADS=1 python bench/bench_logprobs.py [--tokens 512,1024,2048] [--chunk 256]
        [--device cpu|cuda] [--json out.json] [--vocab 151936 --hidden 2048]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from drpo_megatron.training.logprobs import naive_logprobs, vocab_parallel_logprobs  # noqa: E402

V, H = 151_936, 2048
SHAPE = [V, H]  # (vocab, hidden) of this run: --vocab / --hidden (tools/gpu_check.py's smoke run)
M_MMAP_THRESHOLD = -3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _inputs(T: int, device: str):
    V, H = SHAPE
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(device).requires_grad_(True)
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    upstream = torch.randn(T, generator=g).to(device)
    return hidden, weight, targets, upstream


def _call(method: str, hidden, weight, targets, upstream, chunk: int) -> None:
    if method == "bare":
        (hidden @ weight.t()).sum().backward()  # (frozen weight: grad w.r.t. hidden only)
    elif method == "naive":
        (naive_logprobs(hidden, weight, targets) * upstream).sum().backward()
    elif method == "chunked":
        logp, _ = vocab_parallel_logprobs(hidden, weight, targets, chunk_size=chunk)
        (logp * upstream).sum().backward()
    else:
        raise ValueError(method)


def child(method: str, T: int, chunk: int, device: str) -> dict:
    if device == "cpu":
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        except OSError:
            pass
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # warm-up (lazy init of kernels / allocator) on a small problem
    w_h, w_w, w_t, w_u = _inputs(16, device)
    _call(method, w_h, w_w, w_t, w_u, chunk)
    del w_h, w_w, w_t, w_u
    hidden, weight, targets, upstream = _inputs(T, device)
    # 1) frozen weight: the log-prob computation's own extra memory
    weight.requires_grad_(False)
    extra = _measure(method, hidden, weight, targets, upstream, chunk, device)[1]
    hidden.grad = None
    weight.requires_grad_(True)
    # 2) both gradients: time and total peak
    seconds, peak = _measure(method, hidden, weight, targets, upstream, chunk, device)
    return {"method": method, "T": T, "chunk": chunk, "seconds": seconds,
            "peak_bytes": peak, "extra_bytes": extra}


def _measure(method, hidden, weight, targets, upstream, chunk, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        _call(method, hidden, weight, targets, upstream, chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib("VmRSS") * 1024
        _reset_hwm()
        t0 = time.process_time()
        _call(method, hidden, weight, targets, upstream, chunk)
        seconds = time.process_time() - t0
        peak = _rss_kib("VmHWM") * 1024 - base
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,1024,2048")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--vocab", type=int, default=V)
    ap.add_argument("--hidden", type=int, default=H)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    SHAPE[:] = [args.vocab, args.hidden]
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.chunk, args.device)))
        return
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        res = {}
        for method in ("bare", "naive", "chunked"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method,
                                  str(T), "--chunk", str(args.chunk), "--device", args.device,
                                  "--vocab", str(args.vocab), "--hidden", str(args.hidden)],
                                 capture_output=True, text=True, check=True)
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(res[method]), file=sys.stderr, flush=True)
        n, c, b = res["naive"], res["chunked"], res["bare"]
        rows.append({"T": T, "chunk": args.chunk, "bare_s": b["seconds"], "naive_s": n["seconds"],
                     "chunked_s": c["seconds"], "chunked_time_vs_bare": c["seconds"] / b["seconds"],
                     "naive_time_vs_bare": n["seconds"] / b["seconds"],
                     "naive_extra_mib": n["extra_bytes"] / 2**20,
                     "chunked_extra_mib": c["extra_bytes"] / 2**20,
                     "extra_ratio": c["extra_bytes"] / n["extra_bytes"],
                     "naive_peak_mib": n["peak_bytes"] / 2**20,
                     "chunked_peak_mib": c["peak_bytes"] / 2**20,
                     "peak_ratio": c["peak_bytes"] / n["peak_bytes"]})
    print(f"device {args.device}, V={args.vocab}, H={args.hidden}, fp32, chunk {args.chunk}, torch {torch.__version__}")
    print("| T | bare s | naive s | chunked s | chunked / bare | naive / bare | naive extra MiB "
          "| chunked extra MiB | extra ratio | naive peak MiB | chunked peak MiB | peak ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['bare_s']:.2f} | {r['naive_s']:.2f} | {r['chunked_s']:.2f} | "
              f"{r['chunked_time_vs_bare']:.2f} | {r['naive_time_vs_bare']:.2f} | "
              f"{r['naive_extra_mib']:.0f} | {r['chunked_extra_mib']:.0f} | {r['extra_ratio']:.3f} | "
              f"{r['naive_peak_mib']:.0f} | {r['chunked_peak_mib']:.0f} | {r['peak_ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
