#!/usr/bin/env python
"""Weight-sync throughput of each transport (disk, tensor, distributed) to one real SGLang server,
as ratios to a plain memory copy of the same bytes measured in the same run.

The model is a random Qwen3-MoE built from the embedded tiny policy's config with wider layers
(``--hidden``, ``--layers``, ``--experts``; tokenizer and vocabulary of the tiny policy), saved
in bf16.  A push sends every HF-named tensor (cast to the server's bf16) in buckets of
``--bucket-mb``; bytes = the bf16 bytes of the model.  Repetitions are interleaved (each rep
runs the copy baseline, then every transport once, in a shuffled order); a transport's ratio is
the median over reps of copy_time / push_time (= its bytes/s over memcpy's bytes/s).  Wall time
(a push is several processes).  The push includes everything the trainer waits for: export /
serialization, the server's load, begin/end_weight_update, cache flush, version check.

    OMP_NUM_THREADS=1 python bench/bench_weight_sync.py [--reps 3] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(out: Path, hidden: int, layers: int, experts: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from drpo_megatron.config import ModelConfig, TaskConfig
    from drpo_megatron.models.tiny import ensure_tiny_checkpoint

    m = ModelConfig()
    tiny = ensure_tiny_checkpoint(m.cache_dir, m.tiny, max_operand=TaskConfig().max_operand,
                                  show_progress=False)
    cfg = AutoConfig.from_pretrained(str(tiny))
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = layers
    cfg.num_experts = experts
    cfg.moe_intermediate_size = hidden
    cfg.intermediate_size = 2 * hidden
    cfg.num_attention_heads = max(hidden // 128, 1)
    cfg.num_key_value_heads = max(hidden // 512, 1)
    cfg.head_dim = 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


class Actor:
    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.path = path
        self.sd = {}
        for f in sorted(path.glob("*.safetensors")):
            self.sd.update(load_file(str(f)))
        self.nbytes = sum(t.numel() * t.element_size() for t in self.sd.values())

    def named_hf_tensors(self, precision="bf16"):
        return iter(self.sd.items())

    def export_hf(self, out_dir, precision="bf16"):
        from drpo_megatron.weights.hf_export import write_hf_checkpoint

        return write_hf_checkpoint(self.named_hf_tensors(), out_dir, source_dir=self.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--bucket-mb", type=float, default=64)
    args = ap.parse_args()

    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()  # no-op on CUDA; transformers' model imports need it on CPU
    from drpo_megatron.rollout.server import ServerConfig, SGLangServer
    from drpo_megatron.weights.transport import build_transport

    work = Path(tempfile.mkdtemp(prefix="bench_wsync_"))
    path = build_model(work / "model", args.hidden, args.layers, args.experts)
    actor = Actor(path)
    server = SGLangServer(path, ServerConfig(startup_timeout_s=300, extra_args=[
        "--mem-fraction-static", "0.25"]), work / "logs", name="sglang-bench").start()
    names = ["disk", "tensor", "distributed"]
    times: dict[str, list[float]] = {n: [] for n in names + ["copy"]}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    try:
        server.wait_healthy()
        transports = {n: build_transport(n, actor, [server], work / "w", bucket_mb=args.bucket_mb)
                      for n in names}
        src = list(actor.sd.values())
        dst = [torch.empty_like(t) for t in src]
        version = 0
        for d, s in zip(dst, src):  # first touch of dst pages is not a copy cost
            d.copy_(s)
        for n in names:  # warm-up (distributed: group set-up, excluded from timings)
            version += 1
            transports[n].push(version)
        for rep in range(args.reps):
            t0 = time.perf_counter()
            for d, s in zip(dst, src):
                d.copy_(s)
            t_copy = time.perf_counter() - t0
            times["copy"].append(t_copy)
            order = names[:]
            random.Random(rep).shuffle(order)
            for n in order:
                version += 1
                t0 = time.perf_counter()
                transports[n].push(version)
                dt = time.perf_counter() - t0
                times[n].append(dt)
                ratios[n].append(t_copy / dt)
        transports["distributed"].close()
    finally:
        server.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    gb = actor.nbytes / 1e9
    print(f"model: {gb * 1e3:.0f} MB bf16 ({len(actor.sd)} tensors), bucket {args.bucket_mb} MiB, "
          f"{args.reps} reps, commit {commit}")
    print("| transport | median push s | GB/s | ratio to memcpy |")
    print("|---|---|---|---|")
    med = statistics.median(times["copy"])
    print(f"| memcpy | {med:.4f} | {gb / med:.2f} | 1 |")
    for n in names:
        m = statistics.median(times[n])
        print(f"| {n} | {m:.3f} | {gb / m:.3f} | {statistics.median(ratios[n]):.4f} |")
    print(json.dumps({"times": times, "ratios": ratios, "bytes": actor.nbytes}))


if __name__ == "__main__":
    main()
