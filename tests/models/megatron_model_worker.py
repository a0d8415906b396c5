"""Exercises drpo_megatron.models.megatron_model in one process (script for the tests).

``python megatron_model_worker.py HF_DIR OUT_JSON`` (HF_DIR: a tiny Qwen3-MoE checkpoint made
by ``tests/platform/megatron_dist_worker.py make-hf``).  Records shapes, errors and numbers
that ``test_megatron_model.py`` asserts on.  Guarded by ``__main__`` (torch_dist saves spawn).
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def main(hf_dir: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training import checkpoint as ckpt

    work = os.path.dirname(os.path.abspath(out))
    res: dict = {}

    info = mm.init_distributed(tp=1, pp=1, ep=1, seed=3)
    res["init"] = info
    res["init_again"] = mm.init_distributed(tp=1, pp=1, ep=1)  # idempotent
    try:
        mm.init_distributed(tp=2)
        res["init_mismatch_error"] = None
    except RuntimeError as e:
        res["init_mismatch_error"] = str(e)
    res["dp_world"] = mm.data_parallel_world_size()

    bridge, provider, model = mm.load_policy_from_hf(hf_dir, dtype="fp32", wrap_ddp=True)
    res["chunks"] = len(model)
    res["wrapper"] = type(model[0]).__name__
    res["vocab_size"] = mm.vocab_size(model)
    res["cpu_overrides_applied"] = {
        k: getattr(provider, k) for k in ("use_cpu_initialization", "moe_grouped_gemm",
                                          "add_bias_linear", "gradient_accumulation_fusion")}
    try:
        mm.build_optimizer(model, lr=1e-3, use_distributed_optimizer=True)
        res["opt_mismatch_error"] = None
    except ValueError as e:
        res["opt_mismatch_error"] = str(e)
    opt = mm.build_optimizer(model, lr=1e-2, weight_decay=0.0, grad_clip=1.0,
                             adam_betas=(0.9, 0.99))

    g = torch.Generator().manual_seed(0)
    B, S = 3, 10
    ids = torch.randint(0, 128, (B, S + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(S).expand(B, S)
    mask = mm.causal_attention_mask(S)
    res["mask"] = {"shape": list(mask.shape), "dtype": str(mask.dtype),
                   "masked_above_diagonal": bool(mask[0, 0, 0, 1]) and not bool(mask[0, 0, 1, 0])}

    # forward contract: logits / per-token loss / final hidden states
    with torch.no_grad(), mm.capture_final_hidden(model[0]) as cap:
        logits = model[0](x, pos, mask)
        per_token = model[0](x, pos, mask, labels=y)
    res["logits"] = {"shape": list(logits.shape), "dtype": str(logits.dtype)}
    res["hidden_shape"] = list(cap["hidden"].shape)
    res["per_token_loss_shape"] = list(per_token.shape)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           reduction="none").view(B, S)
    res["labels_loss_vs_ce"] = (ce - per_token).abs().max().item()

    # hand-written training loop: backward, finalize_model_grads, optimizer.step
    from megatron.core.distributed import finalize_model_grads

    losses = []
    for _ in range(4):
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        loss = model[0](x, pos, mask, labels=y).mean()
        loss.backward()
        finalize_model_grads(model)
        ok, grad_norm, _ = opt.step()
        losses.append(loss.item())
        assert ok and math.isfinite(grad_norm)
    res["losses"] = losses

    # export after training: names as in the HF checkpoint, values changed
    orig = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = dict(mm.export_hf_state_dict(bridge, model))
    res["export_names_equal"] = sorted(exported) == sorted(orig)
    res["export_changed"] = sum(not torch.equal(exported[n], orig[n]) for n in orig)
    res["export_dtypes"] = sorted({str(t.dtype) for t in exported.values()})

    # HF checkpoint: atomic write, loadable by transformers, equal to the export
    hf_out = os.path.join(work, "hf_out")
    os.makedirs(hf_out)
    open(os.path.join(hf_out, "stale.txt"), "w").close()  # replaced as a whole
    path = mm.save_hf_checkpoint(bridge, model, hf_out, copy_from=hf_dir)
    res["saved_files"] = sorted(os.listdir(path))
    res["leftovers"] = sorted(n for n in os.listdir(work) if n.startswith("hf_out."))
    saved = load_file(os.path.join(path, "model.safetensors"))
    res["saved_equals_export"] = sorted(saved) == sorted(exported) and all(
        torch.equal(saved[n], exported[n]) for n in saved)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        res["hf_reload_logits_diff"] = (hf(input_ids=x).logits - model[0](x, pos, mask)).abs().max().item()

    # Megatron checkpoint round trip (model + optimizer), resumed loss equals uninterrupted
    ck = os.path.join(work, "mcore_ckpt")
    ckpt.save_megatron_checkpoint(model, opt, ck, step=4)

    def step_losses(mdl, o, n):
        out = []
        for _ in range(n):
            for m in mdl:
                m.zero_grad_buffer()
            o.zero_grad()
            loss = mdl[0](x, pos, mask, labels=y).mean()
            loss.backward()
            finalize_model_grads(mdl)
            o.step()
            out.append(loss.item())
        return out

    res["continued"] = step_losses(model, opt, 2)
    _, _, model2 = mm.load_policy_from_hf(hf_dir, dtype="fp32", wrap_ddp=True)
    opt2 = mm.build_optimizer(model2, lr=1e-2, weight_decay=0.0, grad_clip=1.0,
                              adam_betas=(0.9, 0.99))
    res["loaded_step"] = ckpt.load_megatron_checkpoint(model2, opt2, ck)
    res["resumed"] = step_losses(model2, opt2, 2)

    # bf16 + distributed optimizer
    _, _, model3 = mm.load_policy_from_hf(hf_dir, dtype="bf16", wrap_ddp=True,
                                          use_distributed_optimizer=True)
    opt3 = mm.build_optimizer(model3, lr=1e-2, use_distributed_optimizer=True)
    res["bf16_param_dtype"] = str(next(model3[0].parameters()).dtype)
    with torch.no_grad():
        res["bf16_logits_dtype"] = str(model3[0](x, pos, mask).dtype)
    res["bf16_losses"] = step_losses(model3, opt3, 3)

    mm.destroy_distributed()
    import torch.distributed as dist

    res["destroyed"] = not dist.is_initialized()
    res["reinit"] = mm.init_distributed()
    mm.destroy_distributed()
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
