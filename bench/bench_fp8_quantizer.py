#!/usr/bin/env python
"""Throughput of the FP8 blockwise quantizer as ratios to a plain memory copy of the same bytes.

Workloads are Qwen3-30B-A3B-shaped BF16 weights (hidden 2048, MoE intermediate 768, 32 query
heads and 4 KV heads of 128): 16 experts' ``down_proj`` [2048, 768], 16 experts' ``gate_proj`` /
``up_proj`` [768, 2048], ``q_proj`` [4096, 2048], ``o_proj`` [2048, 4096], ``k_proj``
[512, 2048], and one shape that is not a multiple of 128 ([1000, 3000], the padded path).

Operations, each over all the matrices of a workload:
- ``copy``: ``dst.copy_(w)`` into preallocated BF16 tensors (the baseline: same bytes);
- ``quantize``: ``quantize_blockwise(w)`` -> e4m3 + fp32 inverse scales (the FP8 rollout sync);
- ``fake-quant``: ``fake_quantize_blockwise(w)`` (the CPU FP8-emulation sync);
- ``dequantize``: ``dequantize_blockwise(q, s)`` to BF16.
GB/s counts the BF16 weight bytes (input of quantize/fake-quant, output of dequantize).
Repetitions are interleaved (every repetition runs every operation once per workload, in a
shuffled order); an operation's ratio is the median over repetitions of copy_time / op_time
of that repetition (= its GB/s over copy's GB/s), so slow phases of a shared machine hit both
sides of a ratio.  CPU timings are process CPU time with glibc's heap trimming off (as in
``bench_losses.py``); CUDA timings are wall time around synchronized calls.

    OMP_NUM_THREADS=1 python bench/bench_fp8_quantizer.py [--reps 9] [--device cpu] \
        [--update-doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import textwrap
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from drpo_megatron.weights.fp8 import (dequantize_blockwise, fake_quantize_blockwise,  # noqa: E402
                                       quantize_blockwise)

SECTION = "## FP8 blockwise quantizer"
OPS = ("copy", "quantize", "fake-quant", "dequantize")



def workloads() -> dict[str, list[tuple[int, int]]]:
    return {
        "16 x expert down_proj [2048, 768]": [(2048, 768)] * 16,
        "16 x expert gate/up_proj [768, 2048]": [(768, 2048)] * 16,
        "q_proj [4096, 2048]": [(4096, 2048)],
        "o_proj [2048, 4096]": [(2048, 4096)],
        "k_proj [512, 2048]": [(512, 2048)],
        "unaligned [1000, 3000]": [(1000, 3000)],
    }


class Workload:
    def __init__(self, shapes: list[tuple[int, int]], device: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.w = [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)
                  for s in shapes]
        self.dst = [torch.empty_like(w) for w in self.w]
        self.q = [quantize_blockwise(w) for w in self.w]
        self.nbytes = sum(w.numel() * w.element_size() for w in self.w)

    def run(self, op: str) -> None:
        if op == "copy":
            for d, w in zip(self.dst, self.w):
                d.copy_(w)
        elif op == "quantize":
            for w in self.w:
                quantize_blockwise(w)
        elif op == "fake-quant":
            for w in self.w:
                fake_quantize_blockwise(w)
        elif op == "dequantize":
            for q, s in self.q:
                dequantize_blockwise(q, s)
        else:
            raise ValueError(op)


def _commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    try:
        c = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--", "drpo_megatron/weights/fp8.py",
               "bench/bench_fp8_quantizer.py"):
            c += " + uncommitted changes to the quantizer/benchmark"
        return c
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def update_doc(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section; other sections are left as they are."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    new = text.rstrip("\n").splitlines()
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update-doc", type=Path, default=None,
                    help="write the table into this markdown file's FP8 section")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    cpu = not args.device.startswith("cuda")
    if cpu:
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    clock = time.process_time if cpu else time.perf_counter

    def sync() -> None:
        if not cpu:
            torch.cuda.synchronize()

    loads = {name: Workload(shapes, args.device, seed=i)
             for i, (name, shapes) in enumerate(workloads().items())}
    for wl in loads.values():  # warm-up (and let the heap grow to its working size)
        for op in OPS:
            wl.run(op)
    times = {(n, op): [] for n in loads for op in OPS}
    rng = random.Random(0)
    for _ in range(args.reps):
        for n, wl in loads.items():
            order = list(OPS)
            rng.shuffle(order)
            for op in order:
                sync()
                t0 = clock()
                wl.run(op)
                sync()
                times[n, op].append(clock() - t0)

    kind = "CPU time" if cpu else "wall time"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    out = [SECTION, "",
           "`bench/bench_fp8_quantizer.py`: `drpo_megatron/weights/fp8.py` on Qwen3-30B-A3B-shaped "
           "BF16 weights (16 experts' projections, q/o/k_proj, one shape that is not a multiple "
           "of 128). `quantize` is the FP8-rollout sync (e4m3 + fp32 128x128 inverse scales), "
           "`fake-quant` the CPU FP8-emulation sync (quantize then dequantize back to BF16), "
           "`dequantize` e4m3 -> BF16. GB/s counts the BF16 weight bytes (median); `x copy` is "
           "the median over repetitions of copy_time / op_time in the same repetition, "
           "`Tensor.copy_` of the same bytes into a preallocated tensor being the baseline "
           "(1.0 = as fast as a memory copy). Repetitions are interleaved in a shuffled order; "
           "CPU clock = process CPU time with glibc heap trimming off (as for the policy losses).",
           "", "```", "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fp8_quantizer.py "
           "--update-doc docs/benchmarks.md", "```", "",
           f"Measured at commit `{_commit()}`: device {args.device}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} thread(s), {args.reps} interleaved reps ({kind}{load}):",
           "",
           "| workload | MiB bf16 | copy GB/s | quantize GB/s | x copy | fake-quant GB/s | "
           "x copy | dequantize GB/s | x copy |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for n, wl in loads.items():
        gbps = {op: wl.nbytes / statistics.median(times[n, op]) / 1e9 for op in OPS}
        ratio = {op: statistics.median(c / t for c, t in zip(times[n, "copy"], times[n, op]))
                 for op in OPS}
        rows.append({"workload": n, "mib_bf16": wl.nbytes / 2**20,
                     **{f"{op}_gbps": gbps[op] for op in OPS},
                     **{f"{op}_vs_copy": ratio[op] for op in OPS}})
        out.append(f"| {n} | {wl.nbytes / 2**20:.0f} | {gbps['copy']:.2f} | "
                   f"{gbps['quantize']:.2f} | {ratio['quantize']:.3f} | "
                   f"{gbps['fake-quant']:.2f} | {ratio['fake-quant']:.3f} | "
                   f"{gbps['dequantize']:.2f} | {ratio['dequantize']:.3f} |")
    out += ["", "On CPU the largest single cost of `quantize` is torch's fp32 -> e4m3 cast "
            "(about 45%); e4m3 -> fp32 uses an exact bit remapping through fp16 because torch's "
            "cast is ~20x slower there. Rows are processed in ~2 MiB chunks of whole 128-row "
            "block rows (2x faster than one pass over the whole tensor, and the extra memory is "
            "one chunk). On CUDA the whole tensor is one chunk"
            + ("." if cpu else "; this table is from a GPU.")
            + (" Not yet measured on a GPU (`--device cuda`)." if cpu else "")]
    # wrap the prose to 100 columns like the rest of docs/ (tables and code stay as they are)
    out = [textwrap.fill(line, 100, break_on_hyphens=False, break_long_words=False)
           if line and not line.startswith(("|", "```", "#", "OMP_")) else line for line in out]
    text = "\n".join(out) + "\n"
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"device": args.device, "reps": args.reps, "rows": rows},
                                        indent=1))
    if args.update_doc is not None:
        update_doc(args.update_doc, text)
        print(f"wrote section {SECTION!r} of {args.update_doc}")


if __name__ == "__main__":
    main()
