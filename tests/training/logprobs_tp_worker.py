"""TP=2 check of vocab_parallel_logprobs (run under torchrun, 2 ranks, gloo).

``python -m torch.distributed.run --nproc-per-node 2 logprobs_tp_worker.py OUT_JSON``: every
rank holds its half of the LM-head rows; rank 0 compares logp / entropy / grads (hidden, and
the weight gathered from both shards) with the same function at TP=1 and with the naive
full-vocab reference, and writes the max errors.  Both runs also ask for the log-probs at K
extra ids per row (``extra_ids``: DPPO top-K's policy log-probs), ids from both vocab shards.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    from drpo_megatron.training.logprobs import naive_logprobs, vocab_parallel_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = dist.new_group([0])  # collective: every rank creates it; TP=1 reference on rank 0
    g = torch.Generator().manual_seed(0)
    N, H, V, T = 37, 16, 100, 0.7
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float()
    weight = (0.5 * torch.randn(V, H, generator=g)).float()
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    shard = V // world
    K = 6
    extra_ids = torch.randint(0, V, (N, K), generator=g)
    extra_ids[:, 0] = targets          # the sampled token among them
    extra_ids[:, 1] = shard - 1        # both sides of the shard boundary
    extra_ids[:, 2] = shard

    def run(h0, w0, group_world):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        logp, ent, extra = vocab_parallel_logprobs(h, w, targets, temperature=T, chunk_size=8,
                                                   group=None if group_world > 1 else solo,
                                                   extra_ids=extra_ids)
        assert not extra.requires_grad
        (logp * upstream).sum().backward()
        return logp.detach(), ent, h.grad, w.grad, extra

    lp2, ent2, gh2, gw2_local, ex2 = run(hidden, weight[rank * shard:(rank + 1) * shard], world)
    parts = [torch.empty_like(gw2_local) for _ in range(world)]
    dist.all_gather(parts, gw2_local)
    gw2 = torch.cat(parts)
    res = {}
    if rank == 0:
        lp1, ent1, gh1, gw1, ex1 = run(hidden, weight, 1)
        ex_ref = naive_logprobs(hidden, weight, extra_ids, temperature=T)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        ref = naive_logprobs(h, w, targets, temperature=T)
        (ref * upstream).sum().backward()
        res = {
            "logp_tp2_vs_tp1": (lp2 - lp1).abs().max().item(),
            "entropy_tp2_vs_tp1": (ent2 - ent1).abs().max().item(),
            "grad_h_tp2_vs_tp1": (gh2 - gh1).abs().max().item(),
            "grad_w_tp2_vs_tp1": (gw2 - gw1).abs().max().item(),
            "logp_tp2_vs_naive": (lp2 - ref.detach()).abs().max().item(),
            "grad_h_tp2_vs_naive": (gh2 - h.grad).abs().max().item(),
            "grad_w_tp2_vs_naive": (gw2 - w.grad).abs().max().item(),
            "extra_tp2_vs_naive": (ex2 - ex_ref).abs().max().item(),
            "extra_tp1_vs_naive": (ex1 - ex_ref).abs().max().item(),
            "extra_col0_vs_logp": (ex2[:, 0] - lp2).abs().max().item(),
        }
        with open(out, "w") as fh:
            json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
