"""The real MegatronActor.train_step with ``loss.kl`` / ``loss.correction`` against hand-computed
gradients (script for tests/training/test_loss_terms_actor.py).

``python loss_terms_actor_worker.py HF_DIR OUT_JSON``: one process (gloo).  Builds the actor on
the tiny Qwen3-MoE checkpoint (lr 0: the weights never move, so every configuration below sees the
same weights) and a :class:`ReferencePolicy` on a perturbed copy of it.  For each configuration it
runs ``actor.train_step`` (two micro-batches) and reads the gradient it produced from the DDP
buffers (``main_grad``); then it recomputes the step loss *by hand* from the model's
differentiable log-probs of the same micro-batches, with the loss, correction weight and KL
written out here in plain torch, and takes its gradient with ``torch.autograd.grad``.  Writes the
relative differences (rank 0), the difference to the plain loss's gradient (so that the test
knows the terms mattered) and the reference log-probs' agreement with HF transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

T = 0.9
H = 16  # seq-mean-token-sum-norm horizon
NUM_SAMPLES = 8
MICRO = 4
VOCAB = 128
CONFIGS = {
    "plain_drpo": dict(loss="drpo", params={"delta": 0.5}, correction=dict(kind="none"),
                       kl=dict(coef=0.0)),
    # DRPO (delta 0.5: the penalty matters) anchored on pi_old, IcePop reweighting, KL k3 in the loss
    "drpo_icepop_k3": dict(loss="drpo", params={"delta": 0.5, "anchor": "old_policy"},
                           correction=dict(kind="icepop", low=0.8, high=1.25),
                           kl=dict(coef=0.3, estimator="k3")),
    # PG-IS anchored on mu, geo_mis rejection of whole sequences, KL low_var_kl
    "pg_is_geo_mis_lowvar": dict(loss="pg_is", params={},
                                 correction=dict(kind="geo_mis", low=0.9, high=1.1),
                                 kl=dict(coef=0.1, estimator="low_var_kl")),
    # DRPO anchored on pi_old with sequence-level truncated IS, no KL
    "drpo_seq_tis": dict(loss="drpo", params={"delta": 0.5, "anchor": "old_policy"},
                         correction=dict(kind="seq_tis", high=1.0), kl=dict(coef=0.0)),
    # token TIS with a k2 KL on top
    "pg_is_tis_k2": dict(loss="pg_is", params={"anchor": "old_policy"},
                         correction=dict(kind="tis", high=1.05), kl=dict(coef=0.5, estimator="k2")),
}


def make_samples():
    import torch

    from drpo_megatron.samples import Sample

    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(NUM_SAMPLES):
        p = 3 + int(torch.randint(0, 5, (1,), generator=g))
        r = 2 + int(torch.randint(0, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        mu = (math.log(1 / VOCAB) + 0.3 * torch.randn(r, generator=g)).tolist()
        out.append(Sample(group_id=i // 4, prompt_ids=ids[:p], response_ids=ids[p:],
                          rollout_logp=mu, text="", finish_reason="length", weight_version="0",
                          advantage=float(torch.randn(1, generator=g))))
    return out


def perturbed_copy(hf_dir: str, out_dir: str, std: float = 0.2) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out_dir, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(99)
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors"):
            path = os.path.join(out_dir, name)
            sd = load_file(path)
            save_file({k: v + std * torch.randn(v.shape, generator=g) if v.is_floating_point()
                       else v for k, v in sd.items()}, path, metadata={"format": "pt"})
    return out_dir


def hf_logprobs(hf_dir: str, samples):
    """log softmax(logits / T) of each response token by HF transformers (the independent
    reference of the Megatron reference policy's log-probs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            lsm = torch.log_softmax(model(ids).logits[0].float() / T, -1)
            p = len(s.prompt_ids)
            tgt = torch.tensor(s.response_ids)
            out.append(lsm[p - 1: p - 1 + len(s.response_ids)].gather(1, tgt[:, None])[:, 0])
    return out


def cat(rows):
    import torch

    return torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in rows])


def grads(actor):
    import torch

    return torch.cat([p.main_grad.detach().flatten().clone() for m in actor.model
                      for p in m.parameters()])


def hand_loss(spec, logp, old, mu, ref, adv, seq, n_seqs):
    """The step loss of one micro-batch from its definitions ([N] tokens in the loss)."""
    import torch

    anchor = old if spec["params"].get("anchor") == "old_policy" else mu
    r = torch.exp(logp - anchor)
    if spec["loss"] == "pg_is":
        objective = r * adv
    else:  # DRPO: r A - |A| / (2 delta) * anchor_prob * (r - 1)^2
        delta = spec["params"]["delta"]
        objective = r * adv - adv.abs() / (2 * delta) * torch.exp(anchor) * (r - 1) ** 2
    rho = torch.exp(old - mu)
    c_cfg = spec["correction"]
    if c_cfg["kind"] == "none":
        c = torch.ones_like(rho)
    elif c_cfg["kind"] == "icepop":
        c = torch.where((rho >= c_cfg["low"]) & (rho <= c_cfg["high"]), rho, 0.0)
    elif c_cfg["kind"] == "tis":
        c = rho.clamp(max=c_cfg["high"])
    else:
        c = torch.zeros_like(rho)
        for sid in seq.unique():
            sel = seq == sid
            lr = (old[sel] - mu[sel])
            if c_cfg["kind"] == "seq_tis":
                c[sel] = torch.exp(lr.sum()).clamp(max=c_cfg["high"])
            else:  # geo_mis
                geo = torch.exp(lr.mean())
                c[sel] = float(c_cfg["low"] <= geo <= c_cfg["high"])
    per_token = -c * objective
    kl = spec["kl"]
    if kl["coef"]:
        x = ref - logp
        k3 = torch.exp(x) - 1 - x
        est = {"k3": k3, "low_var_kl": k3.clamp(max=10.0), "k2": x * x / 2, "k1": -x}
        per_token = per_token + kl["coef"] * est[kl["estimator"]]
    return per_token.sum() / (n_seqs * H)


def main(hf_dir: str, out: str) -> None:
    import torch

    from drpo_megatron.algorithms import POLICY_LOSSES
    from drpo_megatron.config import LossSection, ModelConfig, OptimConfig, ParallelConfig
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.batch import pack_samples
    from drpo_megatron.training.config import ActorConfig
    from drpo_megatron.training.reference import ReferencePolicy

    def loss_section(spec=None) -> LossSection:
        spec = spec or {"loss": "drpo", "params": {}, "kl": {}, "correction": {}}
        return LossSection(name=spec["loss"], params=spec["params"], kl=spec["kl"],
                           correction=spec["correction"], aggregation="seq-mean-token-sum-norm",
                           horizon=H)

    mm.init_distributed(timeout_s=120)
    cfg = ActorConfig(hf_path=hf_dir, model=ModelConfig(dtype="fp32", moe_aux_loss_coeff=0.0),
                      optim=OptimConfig(lr=1e-30, weight_decay=0.0, grad_clip=1e9),
                      loss=loss_section(),
                      parallel=ParallelConfig(micro_batch_size=MICRO, use_distributed_optimizer=False),
                      temperature=T, seed=1234)
    actor = MegatronActor(cfg)
    samples = make_samples()
    old = actor.compute_logprobs(samples)  # pi_old, as the loop's mismatch step
    res: dict = {}
    same = ReferencePolicy(cfg, hf_dir)
    res["ref_same_ckpt_vs_actor"] = max(float((a - b).abs().max())
                                        for a, b in zip(same.compute_logprobs(samples), old))
    del same
    ref_dir = perturbed_copy(hf_dir, os.path.join(os.path.dirname(os.path.abspath(out)), "ref"))
    reference = ReferencePolicy(cfg, ref_dir)
    ref = reference.compute_logprobs(samples)
    res["ref_vs_hf"] = max(float((a - b).abs().max())
                           for a, b in zip(ref, hf_logprobs(ref_dir, samples)))
    res["ref_vs_policy"] = max(float((a - b).abs().max()) for a, b in zip(ref, old))
    res["configs"] = {}
    for name, spec in CONFIGS.items():
        actor.cfg.loss = loss_section(spec)
        actor.loss_fn = POLICY_LOSSES[spec["loss"]]
        actor.loss_cfg = actor.cfg.loss.policy
        anchor = old if actor.loss_cfg.anchor == "old_policy" else None
        metrics = actor.train_step(samples, anchor_logp=anchor,
                                   ref_logp=ref if actor.cfg.loss.kl.in_loss else None,
                                   old_logp=old)
        g_actor = grads(actor)
        # the same step by hand, through the same model's differentiable log-probs, with
        # torch.autograd.grad (no DDP hook, no gradient buffer involved)
        params = [p for m in actor.model for p in m.parameters()]
        n_seqs = len(samples)
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        total = 0.0
        for i in range(0, len(samples), MICRO):
            chunk = samples[i:i + MICRO]
            mb = pack_samples(chunk, pad_id=0, seq_len=width, first_seq_id=i)
            logp = actor._forward_logp(actor.model[0], mb, T)[mb.loss_mask]
            total = total + hand_loss(spec, logp, cat(old[i:i + MICRO]),
                                      cat([s.rollout_logp for s in chunk]), cat(ref[i:i + MICRO]),
                                      mb.advantages[mb.loss_mask], mb.seq_ids[mb.loss_mask],
                                      n_seqs)
        actor._entropy.clear()
        g_hand = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
        # and the plain loss's gradient: the terms must change it
        actor.cfg.loss = loss_section({**spec, "kl": {}, "correction": {}})
        actor.train_step(samples, anchor_logp=anchor)
        g_plain = grads(actor)
        res["configs"][name] = {
            "rel_diff": float((g_actor - g_hand).norm() / g_hand.norm()),
            "rel_diff_plain": float((g_plain - g_hand).norm() / g_hand.norm()),
            "grad_norm": float(g_hand.norm()),
            "grad_norm_actor": float(g_actor.norm()),
            "max_abs_diff": float((g_actor - g_hand).abs().max()),
            "loss_actor": metrics["loss/policy_loss"], "loss_hand": float(total),
            "metrics": {k: v for k, v in metrics.items()
                        if k.startswith(("loss/correction/", "loss/kl_ref"))},
        }
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    mm.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
