"""The real MegatronActor with a DPPO top-K loss and with overlong-filtered samples (test script).

``python topk_actor_worker.py HF_DIR LAYOUT OUT_JSON`` (LAYOUT ``single``, or ``tp2`` under
torchrun with 2 ranks).  Writes (rank 0):

- ``topk_vs_logits``: max |π's top-K log-probs the loss received - log_softmax of the model's
  full output-layer logits (all-gathered over TP here, for the reference only) at the same ids|;
- ``step``: loss / grad norm / clip fraction of one dppo_topk_tv train step (compared across
  layouts by the test);
- ``single`` only: ``masked`` / ``subset``: one drpo step with two samples marked
  ``in_loss=False`` vs a fresh actor's step on the other samples only (must be equal).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

VOCAB = 128
K = 5
T = 0.9


def make_samples(n=8):
    import torch

    from drpo_megatron.rollout.engine import Sample

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        p = 3 + int(torch.randint(0, 5, (1,), generator=g))
        r = 2 + int(torch.randint(0, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        resp = ids[p:]
        topk = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(r)])
        for t in range(0, r, 2):  # the sampled token among the top-K on every other position
            if resp[t] not in topk[t].tolist():
                topk[t, K - 1] = resp[t]
        mu_k = torch.log_softmax(torch.randn(r, K + 1, generator=g), -1)[:, :K]
        mu = torch.where(topk == torch.tensor(resp).unsqueeze(1), mu_k, torch.tensor(0.0)).sum(1)
        mu = torch.where(mu == 0, torch.tensor(-6.0), mu)
        out.append(Sample(group_id=i // 4, prompt_ids=ids[:p], response_ids=resp,
                          rollout_logp=mu.tolist(), text="", finish_reason="stop",
                          weight_version="0", advantage=float(torch.randn(1, generator=g)),
                          topk_ids=topk.tolist(), topk_logp=mu_k.tolist()))
    return out


def reference_topk(actor, samples):
    """log_softmax(full logits / T) at each response token's top-K ids, from the output layer."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from drpo_megatron.models.megatron_model import causal_attention_mask
    from drpo_megatron.training.batch import pack_samples

    model = actor.model[0]
    model.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(samples), actor.cfg.parallel.micro_batch_size):
            mb = pack_samples(samples[i:i + actor.cfg.parallel.micro_batch_size], pad_id=0,
                              with_topk=True)
            logits = model(mb.tokens, mb.position_ids, causal_attention_mask(mb.tokens.shape[1]))
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)
            lsm = torch.log_softmax(logits.float() / T, dim=-1)
            rows.append(lsm[mb.loss_mask].gather(1, mb.topk_ids[mb.loss_mask]))
    model.train()
    return torch.cat(rows)


def main(hf_dir: str, layout: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.config import LossSection, ModelConfig, OptimConfig, ParallelConfig
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.config import ActorConfig

    tp = 2 if layout == "tp2" else 1
    mm.init_distributed(tp=tp, timeout_s=120)

    def build(loss, params):
        return MegatronActor(ActorConfig(
            hf_path=hf_dir, model=ModelConfig(dtype="fp32", moe_aux_loss_coeff=0.0),
            optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1e9),
            loss=LossSection(name=loss, params=params, aggregation="seq-mean-token-sum-norm",
                             horizon=16),
            parallel=ParallelConfig(tp=tp, micro_batch_size=4, use_distributed_optimizer=False),
            temperature=T, seed=1234))

    actor = build("dppo_topk_tv", {"delta": 0.02, "top_k": K})
    samples = make_samples()
    ref = reference_topk(actor, samples)
    got = []
    loss_fn = actor.loss_fn

    def spy(*args, **extra):
        got.append(extra["topk_logp_policy"].clone())
        return loss_fn(*args, **extra)

    actor.loss_fn = spy
    m = actor.train_step(samples)
    got = torch.cat(got)
    res = {"layout": layout, "topk_shape": list(got.shape), "ref_shape": list(ref.shape),
           "topk_vs_logits": float((got - ref).abs().max()),
           "step": {"loss": m["loss/policy_loss"], "grad_norm": m["loss/grad_norm"],
                    "clipfrac": m.get("loss/clipfrac_adv_pos", float("nan"))
                    + m.get("loss/clipfrac_adv_neg", float("nan"))}}
    if layout == "single":
        del actor
        masked = make_samples()
        for i in (1, 6):
            masked[i].in_loss = False
        a = build("drpo", {"delta": 0.5})
        mm_ = a.train_step(masked)
        del a
        b = build("drpo", {"delta": 0.5})
        sub = b.train_step([s for i, s in enumerate(make_samples()) if i not in (1, 6)])
        res["masked"] = {"loss": mm_["loss/policy_loss"], "grad_norm": mm_["loss/grad_norm"],
                         "num_tokens": mm_["loss/num_tokens"]}
        res["subset"] = {"loss": sub["loss/policy_loss"], "grad_norm": sub["loss/grad_norm"],
                         "num_tokens": sub["loss/num_tokens"]}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(res, fh)
    mm.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
