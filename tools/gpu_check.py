#!/usr/bin/env python
"""One GPU check, side by side in one run, on a bare single-GPU box (Python 3.12 + a CUDA build
of torch, no internet, none of drpo's other dependencies, no Transformer Engine, no SGLang).

Set-up (the wheels in ``requirements/gpu-check.txt``, ~21 MB, fetched where there is internet)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 -r requirements/gpu-check.txt -d gpu-check-wheels/
    # copy the repository and gpu-check-wheels/ to the GPU box, then there:
    pip install --no-deps --no-index --find-links gpu-check-wheels/ -r requirements/gpu-check.txt

The one command (about 5 minutes on one H100; every section has its own time limit, the whole
run stops starting sections after ``--budget-s``, 450 s)::

    OMP_NUM_THREADS=1 python tools/gpu_check.py --json gpu_check.json --markdown gpu_check.md

Sections, each in its own process (fresh CUDA state; a failing section does not stop the others):

``train``     a ~0.65B-parameter Qwen3-MoE-shaped Megatron-Core GPTModel (random init, local layer
              spec: no Transformer Engine), bf16 with fp32 main params, Megatron DDP + Adam, the
              actor's loss path (final hidden states -> chunked vocab-parallel log-probs); a few
              steps with ``parallel.recompute`` none and full: tokens/s, MFU
              (``drpo_megatron.training.flops``), peak memory.
``logprobs``  ``bench/bench_logprobs.py``: chunked vs naive log-probs at V = 151,936.
``losses``    ``bench/bench_losses.py``: every policy loss vs ``pg_is`` (time, memory).
``fp8``       ``bench/bench_fp8_quantizer.py``: the FP8 blockwise quantizer vs a device copy.
``colocate``  the colocated memory sequence of ``drpo_megatron/rollout/colocate.py`` without
              SGLang, with the allocator SGLang's ``--enable-memory-saver`` uses
              (torch_memory_saver, in-process "torch" hook mode): "server" weights and KV cache
              in pausable regions, paused (the GPU memory measured back with ``cudaMemGetInfo``),
              a training-sized allocation that fits only because of the release, weights resumed
              and refilled by a device copy from the "trainer" copy (the same-host push), then
              the KV cache resumed.

``--device cpu --smoke`` runs every section at toy sizes on CPU (tests/tools/test_gpu_check.py):
it executes the same code paths, its numbers mean nothing.  Exit code: 0 when every section ran
and its checks held.  Results from a GPU go to docs/benchmarks.md (``--markdown`` writes the
section to paste).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("train", "logprobs", "losses", "fp8", "colocate")
RESULT_TAG = "GPU_CHECK_RESULT "
# seconds per section (GPU sizes); the whole run also stops starting new sections at --budget-s
SECTION_TIMEOUT_S = {"train": 200, "logprobs": 150, "losses": 120, "fp8": 90, "colocate": 90}

# ~0.65B total / ~0.38B active parameters (embedding + LM head 2 x 151936 x 1024).
MODEL = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, intermediate_size=0, num_experts=16,
             num_experts_per_tok=2, moe_intermediate_size=512)
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=0, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32)


def _device(name: str):
    import torch

    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ train

def _build(m: dict, seq: int, dev, recompute: str):
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from drpo_megatron.models.megatron_model import recompute_fields

    bf16 = dev.type == "cuda"  # CPU smoke: fp32 (bf16 matmuls are slow there)
    dtype = torch.bfloat16 if bf16 else torch.float32
    extra = {}
    if dev.type == "cpu":
        from drpo_megatron.platform import cpu_transformer_overrides

        extra = {k: v for k, v in cpu_transformer_overrides().items()
                 if k in TransformerConfig.__dataclass_fields__}
    fields = dict(
        num_layers=m["num_hidden_layers"], hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_key_value_heads"],
        kv_channels=m["head_dim"], ffn_hidden_size=m["moe_intermediate_size"] * 4,
        num_moe_experts=m["num_experts"], moe_router_topk=m["num_experts_per_tok"],
        moe_ffn_hidden_size=m["moe_intermediate_size"], moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
        normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        attention_dropout=0.0, hidden_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False)
    cfg = TransformerConfig(**{**fields, **extra, **recompute_fields(recompute)})
    spec = get_gpt_layer_local_spec(num_experts=m["num_experts"], moe_grouped_gemm=False,
                                    qk_layernorm=True, normalization="RMSNorm")
    model = GPTModel(cfg, transformer_layer_spec=spec, vocab_size=m["vocab_size"],
                     max_sequence_length=seq, position_embedding_type="rope",
                     rotary_base=1_000_000, share_embeddings_and_output_weights=False).to(dev)
    if bf16:
        model = Float16Module(cfg, model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                            overlap_grad_reduce=False)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    cfg.finalize_model_grads_func = finalize_model_grads
    return cfg, [model]


def _train_steps(m: dict, *, seq: int, mbs: int, steps: int, chunk: int, dev,
                 recompute: str) -> dict:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training.flops import FlopsModel, device_peak_flops, throughput_metrics
    from drpo_megatron.training.logprobs import vocab_parallel_logprobs

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(1234)  # the same initial weights for every recompute mode
    model_parallel_cuda_manual_seed(1234)
    cfg, model = _build(m, seq, dev, recompute)
    n_params = sum(p.numel() for p in model[0].parameters())
    opt = mm.build_optimizer(model, lr=1e-5, weight_decay=0.01, grad_clip=1.0)
    g = torch.Generator(device=dev).manual_seed(0)
    B, S, V = mbs, seq, m["vocab_size"]
    ids = torch.randint(0, V, (B, S + 1), device=dev, generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(S, device=dev).expand(B, S)
    mask = mm.causal_attention_mask(S, device=dev)

    def processor(*, hidden_states, output_layer, output_weight, **_):
        h = hidden_states.transpose(0, 1).reshape(-1, hidden_states.shape[-1])
        w = output_weight if output_weight is not None else output_layer.weight
        logp, _ = vocab_parallel_logprobs(h, w, y.reshape(-1), chunk_size=chunk,
                                          group=ps.get_tensor_model_parallel_group(),
                                          reduce_hidden_grad=False)
        return logp

    losses, times = [], []
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        model[0].zero_grad_buffer()
        opt.zero_grad()
        loss = -model[0](x, pos, mask, output_processor=processor).mean()
        loss.backward()
        finalize_model_grads(model)
        _, grad_norm, _ = opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"[train recompute={recompute}] step {step}: loss {losses[-1]:.4f} grad_norm "
              f"{float(grad_norm):.3f} {times[-1]:.3f}s", flush=True)
    fm = FlopsModel.from_hf_config(m)
    device_name, peak = device_peak_flops("bf16")
    warm = times[2:] if len(times) > 3 else times[1:] or times
    sec = sum(warm) / len(warm)
    tp = throughput_metrics(fm, tokens=B * S, seq_len=S, seconds=sec, num_devices=1,
                            peak_flops=peak, passes=1.0)
    out = {"recompute": recompute, "device": device_name, "params": n_params,
           "active_matmul_params": fm.active_matmul_params(), "tokens_per_step": B * S,
           "step_s": sec, "losses": losses, "finite": all(math.isfinite(v) for v in losses),
           "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if dev.type == "cuda" else float("nan")), **tp}
    del model, opt
    return out


def section_train(args) -> dict:
    from drpo_megatron.models import megatron_model as mm

    dev = _device(args.device)
    if dev.type == "cpu":
        from drpo_megatron.platform import apply_cpu_compat

        apply_cpu_compat()
    m = SMOKE_MODEL if args.smoke else MODEL
    kw = (dict(seq=32, mbs=2, steps=2, chunk=64) if args.smoke else
          dict(seq=args.seq, mbs=args.mbs, steps=args.steps, chunk=args.chunk))
    mm.init_distributed(seed=1234)
    runs = []
    for mode in ("none", "full"):
        runs.append(_train_steps(m, dev=dev, recompute=mode, **kw))
        if dev.type == "cuda":
            import torch

            torch.cuda.empty_cache()
    mm.destroy_distributed()
    first = [r["losses"][0] for r in runs]  # same weights, same batch: recompute changes no value
    checks = {"losses finite": all(r["finite"] for r in runs),
              "same first loss with recompute full": abs(first[0] - first[1]) <= 1e-3 * abs(first[0])}
    return {"ok": all(checks.values()), "runs": runs, "checks": checks}


# ------------------------------------------------------------------------- bench sections

def _bench(script: str, argv: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = os.path.join(tmp, "out.json")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *argv,
                            "--json", out], capture_output=True, text=True, timeout=timeout)
        print(p.stdout[-4000:], flush=True)
        if p.returncode != 0:
            raise RuntimeError(f"bench/{script} exited {p.returncode}: {p.stderr[-2000:]}")
        with open(out) as fh:
            return json.load(fh)


def section_logprobs(args) -> dict:
    argv = ["--device", args.device]
    argv += (["--tokens", "32", "--chunk", "16", "--vocab", "512", "--hidden", "64"] if args.smoke
             else ["--tokens", args.bench_tokens, "--chunk", "2048"])
    rows = _bench("bench_logprobs.py", argv, SECTION_TIMEOUT_S["logprobs"])
    ok = all(r["extra_ratio"] < 1.0 for r in rows) if not args.smoke else True
    return {"ok": ok, "rows": rows, "checks": {"chunked needs less extra memory than naive": ok}}


def section_losses(args) -> dict:
    argv = ["--device", args.device]
    argv += ["--tokens", "65536", "--reps", "1", "--losses", "drpo,ppo_clip"] if args.smoke \
        else ["--tokens", "1000000", "--reps", "5"]
    res = _bench("bench_losses.py", argv, SECTION_TIMEOUT_S["losses"])
    drpo = next((r for r in res["rows"] if r["loss"] == "drpo"), None)
    ok = True if args.smoke or drpo is None else drpo["time_vs_pg_is"] <= 1.3
    return {"ok": ok, **res, "checks": {"drpo time <= 1.3 x pg_is": ok}}


def section_fp8(args) -> dict:
    res = _bench("bench_fp8_quantizer.py", ["--device", args.device,
                                            "--reps", "1" if args.smoke else "9"],
                 SECTION_TIMEOUT_S["fp8"])
    return {"ok": True, **res}


# ------------------------------------------------------------------------------- colocate

class _PlainSaver:
    """CPU smoke stand-in for torch_memory_saver: regions are plain allocations, pause frees
    them, resume allocates them again (the same sequence of calls, no device memory to read)."""

    def __init__(self):
        from contextlib import nullcontext

        self.region = lambda tag: nullcontext()

    def pause(self, tag):
        pass

    def resume(self, tag):
        pass


def section_colocate(args) -> dict:
    """The colocated sequence (rollout/colocate.py) with SGLang's allocator, no SGLang."""
    import torch

    dev = _device(args.device)
    GiB = 2 ** 30
    if dev.type == "cuda":
        try:
            import torch_memory_saver
        except ImportError:
            return {"ok": False, "skipped": "torch_memory_saver is not installed (it is in "
                                            "requirements/gpu-check.txt)"}
        saver = torch_memory_saver.torch_memory_saver
        saver.hook_mode = "torch"  # in-process pluggable allocator (SGLang's scheduler: LD_PRELOAD)

        def free_bytes() -> int:
            torch.cuda.synchronize()
            return torch.cuda.mem_get_info()[0]
        total = torch.cuda.mem_get_info()[1]
        free0 = free_bytes()
        w_bytes, kv_bytes, act_bytes = int(0.10 * free0), int(0.45 * free0), int(0.60 * free0)
    else:
        saver = _PlainSaver()
        live = {}

        def free_bytes() -> int:  # CPU smoke: nothing to read, a stand-in that keeps the code path
            return -sum(t.numel() * t.element_size() for t in live.values())
        total, free0 = 0, free_bytes()
        w_bytes, kv_bytes, act_bytes = 4 << 20, 16 << 20, 24 << 20
    n_w = w_bytes // 2
    trainer_w = torch.randn(n_w, device=dev).to(torch.bfloat16)  # the trainer's weights (bf16)
    steps: dict = {}
    t0 = time.perf_counter()
    with saver.region(tag="weights"):
        server_w = torch.empty(n_w, dtype=torch.bfloat16, device=dev)
    with saver.region(tag="kv_cache"):
        kv = torch.zeros(kv_bytes // 2, dtype=torch.bfloat16, device=dev)
    server_w.copy_(trainer_w)
    if dev.type == "cpu":
        live.update(w=server_w, kv=kv, t=trainer_w)
    free_loaded = free_bytes()
    # 1. release (what /release_memory_occupation does with the memory saver)
    t = time.perf_counter()
    saver.pause("kv_cache")
    saver.pause("weights")
    if dev.type == "cpu":
        live.pop("w"), live.pop("kv")
    steps["release_s"] = time.perf_counter() - t
    free_released = free_bytes()
    # 2. training: an allocation that fits only because the servers' memory came back
    t = time.perf_counter()
    act = torch.empty(act_bytes // 4, dtype=torch.float32, device=dev)
    if dev.type == "cpu":
        live["act"] = act
    a = act[: 1 << 20].view(1024, 1024)
    (a.normal_() @ a).sum().item()
    free_training = free_bytes()
    del act, a
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # what ColocatedTransport does before resuming
    else:
        live.pop("act")
    steps["train_s"] = time.perf_counter() - t
    # 3. resume weights, push them (device copy = the same-host transport's memory move), KV
    t = time.perf_counter()
    saver.resume("weights")
    steps["resume_weights_s"] = time.perf_counter() - t
    t = time.perf_counter()
    server_w.copy_(trainer_w)
    _sync(dev)
    steps["push_copy_s"] = time.perf_counter() - t
    weights_ok = bool(torch.equal(server_w, trainer_w))
    t = time.perf_counter()
    saver.resume("kv_cache")
    kv.zero_()
    _sync(dev)
    steps["resume_kv_s"] = time.perf_counter() - t
    if dev.type == "cpu":
        live.update(w=server_w, kv=kv)
    free_resumed = free_bytes()
    steps["total_s"] = time.perf_counter() - t0
    released = free_released - free_loaded
    out = {"device_total_gib": total / GiB, "server_weights_gib": w_bytes / GiB,
           "kv_cache_gib": kv_bytes / GiB, "training_alloc_gib": act_bytes / GiB,
           "free_gib": {"start": free0 / GiB, "servers_loaded": free_loaded / GiB,
                        "released": free_released / GiB, "training": free_training / GiB,
                        "resumed": free_resumed / GiB},
           "released_gib": released / GiB,
           "push_copy_gbps": w_bytes / max(steps["push_copy_s"], 1e-9) / 1e9, **steps}
    checks = {"weights equal after resume + push": weights_ok}
    if dev.type == "cuda":
        # the pause returns (almost) all of it: allow 5% for allocator granularity
        checks["release returned weights + KV cache"] = released >= 0.95 * (w_bytes + kv_bytes)
        checks["resume took it again"] = (free_released - free_resumed) >= 0.95 * (w_bytes + kv_bytes)
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


# -------------------------------------------------------------------------------- driver

RUNNERS = {"train": section_train, "logprobs": section_logprobs, "losses": section_losses,
           "fp8": section_fp8, "colocate": section_colocate}


def _run_section(name: str, args, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--device", args.device,
           "--steps", str(args.steps), "--seq", str(args.seq), "--mbs", str(args.mbs),
           "--chunk", str(args.chunk), "--bench-tokens", args.bench_tokens]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s",
                "output_tail": (e.stdout or b"")[-2000:].decode(errors="replace")
                if isinstance(e.stdout, bytes) else (e.stdout or "")[-2000:],
                "wall_s": time.time() - t0}
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if p.returncode != 0 or line is None:
        return {"ok": False, "error": f"exit code {p.returncode}",
                "output_tail": (p.stdout[-1500:] + "\n" + p.stderr[-3000:]), "wall_s": time.time() - t0}
    res = json.loads(line[len(RESULT_TAG):])
    res["wall_s"] = time.time() - t0
    return res


def markdown(results: dict, args) -> str:
    lines = [f"## GPU check (`tools/gpu_check.py`, {args.device})", ""]
    tr = results.get("train", {})
    for r in tr.get("runs", []):
        tps = r.get('perf/tokens_per_s_per_gpu', float('nan'))
        lines.append(f"- MoE train step, recompute {r['recompute']}: {tps:.0f} "
                     f"tokens/s, MFU {r.get('perf/mfu', float('nan')):.3f}, step {r['step_s']:.3f} s, "
                     f"peak {r['peak_mem_gib']:.1f} GiB ({r['device']})")
    for r in results.get("logprobs", {}).get("rows", []):
        lines.append(f"- log-probs T={r['T']}: chunked/bare {r['chunked_time_vs_bare']:.2f}, naive/bare "
                     f"{r['naive_time_vs_bare']:.2f}, extra memory chunked/naive {r['extra_ratio']:.3f}")
    for r in results.get("losses", {}).get("rows", []):
        lines.append(f"- loss {r['loss']}: {r['median_ms']:.2f} ms, {r['time_vs_pg_is']:.2f} x pg_is time, "
                     f"{r['memory_vs_pg_is']:.2f} x memory")
    for r in results.get("fp8", {}).get("rows", []):
        lines.append(f"- FP8 {r['workload']}: quantize {r['quantize_gbps']:.1f} GB/s = "
                     f"{r['quantize_vs_copy']:.3f} x copy ({r['copy_gbps']:.1f} GB/s)")
    c = results.get("colocate", {})
    if "released_gib" in c:
        total = c['server_weights_gib'] + c['kv_cache_gib']
        lines.append(f"- colocate: released {c['released_gib']:.1f} GiB of {total:.1f} "
                     f"(release {c['release_s']:.3f} s, resume weights {c['resume_weights_s']:.3f} s, "
                     f"push copy {c['push_copy_gbps']:.0f} GB/s, resume KV {c['resume_kv_s']:.3f} s)")
    for name, r in results.items():
        if not r.get("ok", False):
            lines.append(f"- **{name}: FAILED** {r.get('error') or r.get('skipped') or r.get('checks')}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU tests): code paths only")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no section after this many seconds")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--bench-tokens", default="2048,8192,16384")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--section", choices=SECTIONS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:  # child: run one section, print its result as one tagged JSON line
        print(RESULT_TAG + json.dumps(RUNNERS[args.section](args), default=str), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --device cpu --smoke for the CPU smoke run)",
                  file=sys.stderr)
            return 2
    wanted = [s for s in args.only.split(",") if s]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        print(f"gpu_check: --only {bad}: choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    t_start = time.time()
    results: dict = {}
    for name in wanted:
        left = args.budget_s - (time.time() - t_start)
        if left <= 10:
            results[name] = {"ok": False, "error": f"not started: --budget-s {args.budget_s:.0f} used up"}
            continue
        print(f"== {name}", flush=True)
        results[name] = _run_section(name, args, min(SECTION_TIMEOUT_S[name] * (3 if args.smoke else 1), left))
        print(f"== {name}: {'ok' if results[name].get('ok') else 'FAILED'} "
              f"({results[name].get('wall_s', 0):.0f}s)", flush=True)
        if not results[name].get("ok"):
            print(results[name].get("error") or results[name].get("skipped") or "",
                  results[name].get("output_tail", "")[-2000:], flush=True)
    summary = {"device": args.device, "smoke": args.smoke, "wall_s": time.time() - t_start,
               "sections": results}
    text = markdown(results, args)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
