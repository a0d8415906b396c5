"""Megatron-Core on CPU, driven as a script by ``test_megatron_cpu.py`` (never imported by tests).

Sub-commands (all write JSON results; every entry point is under ``__main__``, which
torchrun and torch_dist checkpoint saves require):

* ``make-hf DIR``: a tiny random Qwen3-MoE HF checkpoint (transformers, save_pretrained).
* ``gpt OUT``: single process, a tiny MoE GPTModel from Megatron-Core directly (local spec):
  fwd/bwd + Megatron DDP + Megatron optimizer steps, fp32 and bf16, alltoall and allgather
  dispatchers, with and without the distributed optimizer.
* ``roundtrip HF OUT``: HF -> Megatron (megatron-bridge) logits vs HF logits, and the export
  back to HF names vs the original tensors.
* ``layouts HF OUT L1,L2,...``: for each layout (``tp1``, ``tp2`` (with sequence parallel),
  ``ep2a``/``ep2g`` (EP=2, alltoall / allgather dispatcher), ``pp2`` (1F1B)), load the HF
  checkpoint, run 3 SGD steps with Megatron's forward-backward schedule on one fixed batch,
  record loss and grad norm per step.  Run with 1 process or under torchrun with 2.
* ``ckpt HF OUT DIR``: (2 ranks) TP2: 1 Adam step, torch_dist save incl. the distributed
  optimizer, 2 more steps; then TP1 x DP2: load the checkpoint, 2 steps; losses must agree.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

VOCAB = 128
SEQ = 16
BATCH = 4
MICRO = 2


def make_hf(out_dir: str) -> None:
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, decoder_sparse_step=1,
        norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = Qwen3MoeForCausalLM(cfg).float()
    model.save_pretrained(out_dir)


def _batch():
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _write(path: str, payload) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- gpt (direct)


def gpt(out: str) -> None:
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.platform import apply_cpu_compat, cpu_transformer_overrides

    apply_cpu_compat()
    import torch
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    mm.init_distributed(seed=7)
    ids, labels = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = mm.causal_attention_mask(SEQ)
    results = {}
    for dtype in ("fp32", "bf16"):
        for dispatcher in ("alltoall", "allgather"):
            for dist_opt in (False, True):
                model_parallel_cuda_manual_seed(7)
                torch.manual_seed(7)
                bf16 = dtype == "bf16"
                tdtype = torch.bfloat16 if bf16 else torch.float32
                cfg = TransformerConfig(
                    num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
                    moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=0.0,
                    params_dtype=tdtype, pipeline_dtype=tdtype, bf16=bf16,
                    **cpu_transformer_overrides())
                spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
                model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                                 position_embedding_type="rope")
                ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt), model)
                opt = get_megatron_optimizer(OptimizerConfig(
                    optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=bf16, params_dtype=tdtype,
                    use_distributed_optimizer=dist_opt), [ddp])
                losses, norms = [], []
                for _ in range(5):
                    ddp.zero_grad_buffer()
                    opt.zero_grad()
                    logits = ddp(ids, pos, mask)  # labels=None: logits [B, S, V]
                    loss = torch.nn.functional.cross_entropy(
                        logits.float().reshape(-1, VOCAB), labels.reshape(-1))
                    loss.backward()
                    finalize_model_grads([ddp])
                    ok, grad_norm, _ = opt.step()
                    assert ok
                    losses.append(loss.item())
                    norms.append(float(grad_norm))
                key = f"{dtype}/{dispatcher}/{'distopt' if dist_opt else 'opt'}"
                results[key] = {"losses": losses, "grad_norms": norms,
                                "logits_shape": list(logits.shape),
                                "logits_dtype": str(logits.dtype),
                                "optimizer": type(opt).__name__}
    _write(out, results)


# --------------------------------------------------------------------------------- roundtrip


def roundtrip(hf_dir: str, out: str) -> None:
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    bridge, provider, model = mm.load_policy_from_hf(hf_dir, dtype="fp32")
    m = model[0].eval()
    ids, _ = _batch()
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad(), mm.capture_final_hidden(m) as cap:
        mlogits = m(ids, pos, mm.causal_attention_mask(SEQ))
        hf_out = hf(input_ids=ids, output_hidden_states=True)
    hidden = cap["hidden"]
    orig = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = dict(mm.export_hf_state_dict(bridge, model))
    save_dir = os.path.join(os.path.dirname(out), "saved_hf")
    mm.save_hf_checkpoint(bridge, model, save_dir, copy_from=hf_dir)
    saved = load_file(os.path.join(save_dir, "model.safetensors"))
    _write(out, {
        "logits_shape": list(mlogits.shape),
        "hf_logits_shape": list(hf_out.logits.shape),
        "logits_max_abs_diff": (mlogits - hf_out.logits).abs().max().item(),
        "hidden_shape": list(hidden.shape),
        # HF's last hidden state is after the final norm too: [B, S, H] vs Megatron's [S, B, H]
        "hidden_max_abs_diff": (hidden.transpose(0, 1) - hf_out.hidden_states[-1]).abs().max().item(),
        "orig_names": sorted(orig),
        "exported_names": sorted(exported),
        "exported_mismatch": sorted(n for n in orig if n in exported and not torch.equal(
            orig[n], exported[n])),
        "saved_names": sorted(saved),
        "saved_mismatch": sorted(n for n in orig if n in saved and not torch.equal(orig[n], saved[n])),
        "saved_files": sorted(os.listdir(save_dir)),
        "seconds": time.time() - t0,
    })


# ----------------------------------------------------------------------------------- layouts

LAYOUTS = {
    "tp1": dict(tp=1, pp=1, ep=1, dispatcher="alltoall"),
    "tp2": dict(tp=2, pp=1, ep=1, dispatcher="alltoall"),
    "ep2a": dict(tp=1, pp=1, ep=2, dispatcher="alltoall"),
    "ep2g": dict(tp=1, pp=1, ep=2, dispatcher="allgather"),
    "pp2": dict(tp=1, pp=2, ep=1, dispatcher="alltoall"),
}


def _reset_parallel():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _train_steps(model, opt, steps: int):
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from drpo_megatron.models import megatron_model as mm

    ids, labels = _batch()
    pos = torch.arange(SEQ).expand(MICRO, SEQ)
    mask = mm.causal_attention_mask(SEQ)
    micro = [(ids[i:i + MICRO], labels[i:i + MICRO]) for i in range(0, BATCH, MICRO)]
    losses, norms = [], []
    for _ in range(steps):
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()

        def forward_step(it, chunk):
            x, y = next(it)
            out = chunk(x, pos, mask, labels=y)  # last stage: per-token loss [B, S]

            def loss_func(o):
                loss = o.float().mean()
                # clone: the schedule divides the returned loss in place by num_microbatches
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=model,
            num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MICRO,
            forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok
        if reports:  # last pipeline stage
            losses.append(sum(float(r["loss"]) for r in reports) / len(reports))
        norms.append(float(grad_norm))
    return losses, norms


def layouts(hf_dir: str, out: str, names: str) -> None:
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import torch.distributed as dist

    results = {}
    for name in names.split(","):
        lay = LAYOUTS[name]
        t0 = time.time()
        _reset_parallel()
        mm.init_distributed(tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], timeout_s=120)
        bridge, provider, model = mm.load_policy_from_hf(
            hf_dir, tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], wrap_ddp=True,
            overrides={"moe_token_dispatcher_type": lay["dispatcher"], "moe_aux_loss_coeff": 0.0})
        opt = mm.build_optimizer(model, lr=0.5, grad_clip=1.0, optimizer="sgd")
        losses, norms = _train_steps(model, opt, steps=3)
        results[name] = {"losses": losses, "grad_norms": norms,
                         "sequence_parallel": bool(provider.sequence_parallel),
                         "seconds": time.time() - t0}
    rank = dist.get_rank()
    _write(f"{out}.rank{rank}.json", results)
    mm.destroy_distributed()


# -------------------------------------------------------------------------------------- ckpt


def ckpt(hf_dir: str, out: str, ckpt_dir: str) -> None:
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training import checkpoint as mckpt
    from drpo_megatron.platform import apply_cpu_compat

    apply_cpu_compat()
    import torch.distributed as dist

    res = {}
    mm.init_distributed(tp=2, timeout_s=120)
    _, _, model = mm.load_policy_from_hf(hf_dir, tp=2, wrap_ddp=True, use_distributed_optimizer=True,
                                         overrides={"moe_aux_loss_coeff": 0.0})
    opt = mm.build_optimizer(model, lr=1e-2, grad_clip=1.0, use_distributed_optimizer=True)
    res["tp2_step1"], _ = _train_steps(model, opt, 1)
    mckpt.save_megatron_checkpoint(model, opt, ckpt_dir, step=1)
    res["tp2_after"], _ = _train_steps(model, opt, 2)

    # Reload as TP1 x DP2 (the distributed optimizer is then sharded over DP=2).  Between EP=1
    # and EP>1 Megatron's optimizer layout differs (one vs two chained optimizers), so the
    # optimizer state does not reshard across that boundary.
    _reset_parallel()
    mm.init_distributed(tp=1, timeout_s=120)
    _, _, model = mm.load_policy_from_hf(hf_dir, tp=1, wrap_ddp=True, use_distributed_optimizer=True,
                                         overrides={"moe_aux_loss_coeff": 0.0})
    opt = mm.build_optimizer(model, lr=1e-2, grad_clip=1.0, use_distributed_optimizer=True)
    res["loaded_step"] = mckpt.load_megatron_checkpoint(model, opt, ckpt_dir)
    res["dp2_after"], _ = _train_steps(model, opt, 2)
    _write(f"{out}.rank{dist.get_rank()}.json", res)
    mm.destroy_distributed()


def main(argv) -> int:
    cmd, args = argv[0], argv[1:]
    {"make-hf": make_hf, "gpt": gpt, "roundtrip": roundtrip, "layouts": layouts,
     "ckpt": ckpt}[cmd](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
