"""TP=2 check of vocab_parallel_logprobs (run under torchrun, 2 ranks, gloo).

``python -m torch.distributed.run --nproc-per-node 2 logprobs_tp_worker.py OUT_JSON``: every
rank holds its half of the LM-head rows; rank 0 compares logp / entropy / grads (hidden, and
the weight gathered from both shards) with the same function at TP=1 and with the naive
full-vocab reference, and writes the max errors.
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

    def run(h0, w0, group_world):
        h = h0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs(h, w, targets, temperature=T, chunk_size=8,
                                            group=None if group_world > 1 else solo)
        (logp * upstream).sum().backward()
        return logp.detach(), ent, h.grad, w.grad

    lp2, ent2, gh2, gw2_local = run(hidden, weight[rank * shard:(rank + 1) * shard], world)
    parts = [torch.empty_like(gw2_local) for _ in range(world)]
    dist.all_gather(parts, gw2_local)
    gw2 = torch.cat(parts)
    res = {}
    if rank == 0:
        lp1, ent1, gh1, gw1 = run(hidden, weight, 1)
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
        }
        with open(out, "w") as fh:
            json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
