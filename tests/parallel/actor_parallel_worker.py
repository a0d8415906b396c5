"""The real MegatronActor.train_step under one parallel layout (script for the tests).

``python actor_parallel_worker.py HF_DIR LAYOUT OUT_JSON`` (under torchrun with 2 ranks for
every layout except ``single``).  Builds the actor on the tiny Qwen3-MoE checkpoint, runs
``STEPS`` train steps on the same fixed samples (every rank gets all of them; DP ranks take
their slice) and writes per-step loss / grad norm (rank 0).  The ``single`` layout also checks
the chunked log-probs against the full-logits path on the same weights.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

LAYOUTS = {
    "single": dict(tp=1, pp=1, ep=1, use_distributed_optimizer=False),
    "tp2": dict(tp=2, pp=1, ep=1, use_distributed_optimizer=False),
    "pp2": dict(tp=1, pp=2, ep=1, use_distributed_optimizer=False),
    "ep2": dict(tp=1, pp=1, ep=2, use_distributed_optimizer=False),  # EP2 x DP2 (dense params)
    "dp2": dict(tp=1, pp=1, ep=1, use_distributed_optimizer=True),
    "ep2_distopt": dict(tp=1, pp=1, ep=2, use_distributed_optimizer=True),  # EP2 x DP2, sharded Adam
}
STEPS = 2
NUM_SAMPLES = 8
MICRO = 2
VOCAB = 128


def make_samples():
    import torch

    from drpo_megatron.rollout.engine import Sample

    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(NUM_SAMPLES):
        p = 3 + int(torch.randint(0, 5, (1,), generator=g))
        r = 2 + int(torch.randint(0, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        mu = (-4.85 + 0.3 * torch.randn(r, generator=g)).tolist()
        out.append(Sample(group_id=i // 4, prompt_ids=ids[:p], response_ids=ids[p:],
                          rollout_logp=mu, text="", finish_reason="length", weight_version="0",
                          advantage=float(torch.randn(1, generator=g))))
    return out


def main(hf_dir: str, layout: str, out: str) -> None:
    import torch.distributed as dist

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.config import LossSection, ModelConfig, OptimConfig, ParallelConfig
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.config import ActorConfig

    lay = LAYOUTS[layout]
    t0 = time.time()
    mm.init_distributed(tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], timeout_s=120)
    actor = MegatronActor(ActorConfig(
        hf_path=hf_dir, model=ModelConfig(dtype="fp32", moe_aux_loss_coeff=0.0),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1e9),
        loss=LossSection(name="drpo", aggregation="seq-mean-token-sum-norm", horizon=16),
        parallel=ParallelConfig(micro_batch_size=MICRO, **lay), temperature=0.9, seed=1234))
    samples = make_samples()
    res: dict = {"layout": layout, "dp": mm.data_parallel_world_size()}
    if layout == "single":
        chunked = actor.compute_logprobs(samples)
        actor.cfg.logprob_impl = "logits"
        full = actor.compute_logprobs(samples)
        ref_step = actor.train_step(samples)
        actor.cfg.logprob_impl = "chunked"
        res["logp_chunked_vs_logits"] = max(float((a - b).abs().max()) for a, b in zip(chunked, full))
        res["logp_lengths_ok"] = all(len(a) == len(s.response_ids) for a, s in zip(chunked, samples))
        res["logits_path_step1"] = {"loss": ref_step["loss/policy_loss"],
                                    "grad_norm": ref_step["loss/grad_norm"]}
        # fresh weights again for the layout comparison (the step above updated them)
        actor = _reload(actor, hf_dir, lay)
    steps = []
    for _ in range(STEPS):
        m = actor.train_step(samples)
        steps.append({"loss": m["loss/policy_loss"], "grad_norm": m["loss/grad_norm"],
                      "entropy": m.get("loss/entropy")})
    res["steps"] = steps
    res["seconds"] = time.time() - t0
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(res, fh)
    mm.destroy_distributed()


def _reload(actor, hf_dir, lay):
    from drpo_megatron.training.actor import MegatronActor

    cfg = actor.cfg
    del actor
    return MegatronActor(cfg)


def resume(hf_dir: str, out: str) -> None:
    """One process: 1 step, save (+ trainer state), 2 steps; a fresh actor loads the checkpoint
    and runs the same 2 steps: losses / grad norms / trainer state must match."""
    import torch

    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training import checkpoint as ckpt
    from drpo_megatron.config import LossSection, ModelConfig, OptimConfig, ParallelConfig
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.config import ActorConfig

    mm.init_distributed(timeout_s=120)
    cfg = ActorConfig(hf_path=hf_dir, model=ModelConfig(dtype="fp32", moe_aux_loss_coeff=0.0),
                      optim=OptimConfig(lr=1e-3, weight_decay=0.01),
                      loss=LossSection(name="drpo", horizon=16),
                      parallel=ParallelConfig(micro_batch_size=MICRO, use_distributed_optimizer=False))
    actor = MegatronActor(cfg)
    samples = make_samples()
    actor.train_step(samples)
    ck = os.path.join(os.path.dirname(os.path.abspath(out)), "ckpt")
    actor.save_checkpoint(ck, step=1, extra_state={"cursor": 5, "order": [3, 1, 2]})
    rng_after_save = torch.rand(3).tolist()
    cont = [actor.train_step(samples) for _ in range(2)]
    actor2 = MegatronActor(cfg)
    step, extra = actor2.load_checkpoint(ckpt.find_checkpoint(ck))
    rng_after_load = torch.rand(3).tolist()
    res = [actor2.train_step(samples) for _ in range(2)]
    with open(out, "w") as fh:
        json.dump({"step": step, "extra": extra,
                   "rng_equal": rng_after_save == rng_after_load,
                   "continued": [[m["loss/policy_loss"], m["loss/grad_norm"]] for m in cont],
                   "resumed": [[m["loss/policy_loss"], m["loss/grad_norm"]] for m in res],
                   "files": sorted(os.listdir(ck))}, fh)
    mm.destroy_distributed()


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume(*sys.argv[2:4])
    else:
        main(*sys.argv[1:4])
