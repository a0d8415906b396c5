#!/usr/bin/env python
"""One short GPU check (one H100/H200, no internet, no Transformer Engine needed).

1. Builds a ~0.65B-parameter Qwen3-MoE-shaped Megatron-Core GPTModel from a config (random init,
   nothing downloaded; local layer spec, so it runs without Transformer Engine), bf16 with fp32
   main params, Megatron DDP + Adam, and trains a few steps with the actor's loss path: final
   hidden states -> chunked vocab-parallel log-probs (``output_processor``) -> mean NLL.
   Prints tokens/s and MFU (``drpo_megatron.training.flops``: 6 N_active + causal attention).
2. Runs ``bench/bench_logprobs.py --device cuda`` (naive vs chunked log-probs at V=151,936).

    OMP_NUM_THREADS=1 python tools/gpu_check.py [--steps 6] [--seq 2048] [--mbs 4]
        [--skip-bench] [--bench-tokens 2048,8192,16384]

About 2-4 minutes on one H100.  Exit code 0 when every step's loss is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ~0.65B total / ~0.38B active parameters (embedding + LM head 2 x 151936 x 1024).
MODEL = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, intermediate_size=0, num_experts=16,
             num_experts_per_tok=2, moe_intermediate_size=512)


def build(seq: int):
    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = MODEL
    cfg = TransformerConfig(
        num_layers=m["num_hidden_layers"], hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_key_value_heads"],
        kv_channels=m["head_dim"], ffn_hidden_size=m["moe_intermediate_size"] * 4,
        num_moe_experts=m["num_experts"], moe_router_topk=m["num_experts_per_tok"],
        moe_ffn_hidden_size=m["moe_intermediate_size"], moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
        normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        attention_dropout=0.0, hidden_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False)
    spec = get_gpt_layer_local_spec(num_experts=m["num_experts"], moe_grouped_gemm=False,
                                    qk_layernorm=True, normalization="RMSNorm")
    model = GPTModel(cfg, transformer_layer_spec=spec, vocab_size=m["vocab_size"],
                     max_sequence_length=seq, position_embedding_type="rope",
                     rotary_base=1_000_000, share_embeddings_and_output_weights=False).cuda()
    model = Float16Module(cfg, model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False,
                                            overlap_grad_reduce=False)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    cfg.finalize_model_grads_func = finalize_model_grads
    return cfg, [model]


def train(args) -> dict:
    import torch

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training.flops import FlopsModel, device_peak_flops, throughput_metrics
    from drpo_megatron.training.logprobs import vocab_parallel_logprobs

    mm.init_distributed(seed=1234)
    cfg, model = build(args.seq)
    n_params = sum(p.numel() for p in model[0].parameters())
    opt = mm.build_optimizer(model, lr=1e-5, weight_decay=0.01, grad_clip=1.0)
    from megatron.core.distributed import finalize_model_grads
    from megatron.core import parallel_state as ps

    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, V = args.mbs, args.seq, MODEL["vocab_size"]
    ids = torch.randint(0, V, (B, S + 1), device="cuda", generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(S, device="cuda").expand(B, S)
    mask = mm.causal_attention_mask(S, device="cuda")

    def processor(*, hidden_states, output_layer, output_weight, **_):
        h = hidden_states.transpose(0, 1).reshape(-1, hidden_states.shape[-1])
        w = output_weight if output_weight is not None else output_layer.weight
        logp, _ = vocab_parallel_logprobs(h, w, y.reshape(-1), chunk_size=args.chunk,
                                          group=ps.get_tensor_model_parallel_group(),
                                          reduce_hidden_grad=False)
        return logp

    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model[0].zero_grad_buffer()
        opt.zero_grad()
        loss = -model[0](x, pos, mask, output_processor=processor).mean()
        loss.backward()
        finalize_model_grads(model)
        ok, grad_norm, _ = opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f} grad_norm {float(grad_norm):.3f} "
              f"{times[-1]:.3f}s", flush=True)
    fm = FlopsModel.from_hf_config(MODEL)
    device, peak = device_peak_flops("bf16")
    warm = times[2:] if len(times) > 3 else times[1:]
    sec = sum(warm) / len(warm)
    tp = throughput_metrics(fm, tokens=B * S, seq_len=S, seconds=sec, num_devices=1,
                            peak_flops=peak, passes=1.0)
    out = {"device": device, "params": n_params, "active_matmul_params": fm.active_matmul_params(),
           "tokens_per_step": B * S, "step_s": sec, "losses": losses,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, **tp}
    print(json.dumps(out, indent=1))
    assert all(math.isfinite(v) for v in losses), losses
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bench-tokens", default="2048,8192,16384")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    train(args)
    if not args.skip_bench:
        from drpo_megatron.models import megatron_model as mm

        mm.destroy_distributed()
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_logprobs.py"),
                        "--device", "cuda", "--tokens", args.bench_tokens, "--chunk", "2048"],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
