#!/usr/bin/env python
"""Activation recompute (``parallel.recompute``: none | selective | full) on the real Megatron-Core
model: peak activation memory, step time, and that losses and gradients do not change.

One process, world of one (gloo on CPU, NCCL on GPU), a Qwen3-MoE-shaped checkpoint made here
with transformers (random init, fp32).  For each mode the model is built through
``megatron_model.load_policy_from_hf(recompute=mode)`` (the path ``drpo train`` takes), then one
forward + backward of the per-token cross entropy (mean) on fixed token ids:

* **loss / gradients**: compared with mode ``none`` (max |diff| over every parameter gradient);
* **recompute happened**: forward calls of layer 0 and of its core attention during one
  forward + backward (``none``: 1 and 1; ``selective``: core attention 2; ``full``: layer 2);
* **peak activation memory**: the peak of live tensor bytes during forward + backward above what
  was alive before it (parameters and gradients exist already: the step is measured after a
  warm-up step whose gradients stay allocated), so what remains is activations kept for backward
  plus transient buffers.  CPU: torch's profiler memory timeline (``profile_memory=True``; every
  tensor allocation and free of the CPU allocator) -- ``tracemalloc`` cannot be used, it sees only
  Python's own allocator, not the c10 allocator that holds tensor storage; RSS would mix in the
  Python heap and glibc's caching.  CUDA: ``torch.cuda.max_memory_allocated`` above the start.

    OMP_NUM_THREADS=1 python bench/bench_recompute.py [--layers 4 --hidden 256 --seq 512 --batch 2]
        [--reps 3] [--json out.json] [--check]

``--check`` exits 1 unless losses/gradients match (|diff| <= 1e-5 relative), recompute was
observed, and the peak drops none > selective > full (what tests/models/test_recompute.py runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("none", "selective", "full")
GRAD_RTOL = 1e-5  # recompute repeats the same fp32 ops: the gradients match to rounding


def make_hf(out: str, *, layers: int, hidden: int, heads: int, kv_heads: int, experts: int,
            topk: int, moe_ffn: int, vocab: int, seq: int) -> str:
    """A random-init Qwen3-MoE HF checkpoint (fp32 safetensors) in ``out``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, intermediate_size=4 * moe_ffn,
                         moe_intermediate_size=moe_ffn, num_experts=experts,
                         num_experts_per_tok=topk, decoder_sparse_step=1, norm_topk_prob=True,
                         max_position_embeddings=max(seq, 64), tie_word_embeddings=False,
                         rms_norm_eps=1e-6, router_aux_loss_coef=0.0)
    Qwen3MoeForCausalLM(cfg).float().save_pretrained(out)
    return out


def _count_calls(module: torch.nn.Module, counter: dict, key: str):
    def hook(*_):
        counter[key] = counter.get(key, 0) + 1
    return module.register_forward_hook(hook)


def _peak_cpu_bytes(step) -> int:
    """Peak live CPU tensor bytes during ``step()`` above the bytes alive when it starts."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.PREEXISTING:
            continue  # alive before the step: the baseline
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _peak_cuda_bytes(step) -> int:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def run_mode(hf: str, mode: str, ids: torch.Tensor, reps: int) -> dict:
    from drpo_megatron.models import megatron_model as mm

    _, _, model = mm.load_policy_from_hf(hf, dtype="fp32", recompute=mode, wrap_ddp=False)
    m = mm.unwrap_model(model[0])
    m.train()
    dev = next(m.parameters()).device
    x, y = ids[:, :-1].to(dev), ids[:, 1:].to(dev)
    B, S = x.shape
    pos = torch.arange(S, device=dev).expand(B, S)
    mask = mm.causal_attention_mask(S, device=dev)

    def step():
        loss = model[0](x, pos, mask, labels=y).float().mean()
        loss.backward()
        return loss

    for p in m.parameters():
        p.grad = None
    loss = float(step())  # warm-up: allocates the gradients (kept for the measured steps)
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    layer = m.decoder.layers[0]
    calls: dict = {}
    hooks = [_count_calls(layer, calls, "layer0"),
             _count_calls(layer.self_attention.core_attention, calls, "core_attention0")]
    step()
    for h in hooks:
        h.remove()
    cuda = dev.type == "cuda"
    peak = (_peak_cuda_bytes if cuda else _peak_cpu_bytes)(step)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"mode": mode, "loss": loss, "grads": grads, "calls": calls, "peak_bytes": peak,
           "step_s": statistics.median(times),
           "granularity": m.config.recompute_granularity, "modules": m.config.recompute_modules}
    model = m = layer = None  # the closure above holds `model`: drop the references
    gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--moe-ffn", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()  # no-op with CUDA; on CPU before transformers (torchvision op schemas)
    with tempfile.TemporaryDirectory(prefix="bench_recompute_") as tmp:
        hf = make_hf(os.path.join(tmp, "hf"), layers=args.layers, hidden=args.hidden,
                     heads=args.heads, kv_heads=args.kv_heads, experts=args.experts,
                     topk=args.topk, moe_ffn=args.moe_ffn, vocab=args.vocab, seq=args.seq + 1)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        mm.init_distributed(seed=1234)
        res = [run_mode(hf, mode, ids, args.reps) for mode in MODES]
        mm.destroy_distributed()
    base = res[0]
    rows = []
    for r in res:
        diff = max(float((r["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                   for n, g in base["grads"].items())
        rows.append({"mode": r["mode"], "loss": r["loss"], "loss_diff": abs(r["loss"] - base["loss"]),
                     "max_rel_grad_diff": diff, "n_grads": len(r["grads"]),
                     "layer0_calls": r["calls"].get("layer0", 0),
                     "core_attention0_calls": r["calls"].get("core_attention0", 0),
                     "peak_activation_mib": r["peak_bytes"] / 2**20, "step_s": r["step_s"],
                     "granularity": r["granularity"], "modules": r["modules"]})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"recompute on {dev}: {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
          f"top-{args.topk}, batch {args.batch} x seq {args.seq}, fp32")
    print(f"{'mode':<10}{'loss':>12}{'max rel grad diff':>19}{'calls L0/attn':>15}"
          f"{'peak act MiB':>14}{'step s':>9}")
    for r in rows:
        print(f"{r['mode']:<10}{r['loss']:>12.6f}{r['max_rel_grad_diff']:>19.2e}"
              f"{r['layer0_calls']:>9}/{r['core_attention0_calls']:<5}"
              f"{r['peak_activation_mib']:>14.1f}{r['step_s']:>9.3f}")
    summary = {"device": dev, "args": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    if args.check:
        by = {r["mode"]: r for r in rows}
        problems = []
        for r in rows:
            if r["max_rel_grad_diff"] > GRAD_RTOL or r["loss_diff"] > GRAD_RTOL * abs(base["loss"]):
                problems.append(f"{r['mode']}: loss/gradients differ from none")
        if by["none"]["layer0_calls"] != 1 or by["none"]["core_attention0_calls"] != 1:
            problems.append("none: something was recomputed")
        if by["selective"]["core_attention0_calls"] != 2 or by["selective"]["layer0_calls"] != 1:
            problems.append("selective: core attention not recomputed")
        if by["full"]["layer0_calls"] != 2:
            problems.append("full: layer not recomputed")
        if not (by["none"]["peak_activation_mib"] > by["selective"]["peak_activation_mib"]
                > by["full"]["peak_activation_mib"]):
            problems.append("peak activation memory does not drop none > selective > full")
        if problems:
            print("CHECK FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        print("check ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
