"""Routing replay (R3) in the real MegatronActor under one parallel layout (script for the tests).

``python routing_replay_worker.py HF_DIR LAYOUT MODE OUT_JSON [RECOMPUTE [SAMPLES.pkl]]`` (under
torchrun with 2 ranks for tp2 / pp2 / ep2).  MODE: off | record | replay; RECOMPUTE: none |
selective | full.  The samples carry synthetic engine routes (random distinct experts per token
and layer, fixed seed: replay then forces routes the trainer's router would not pick), or are a
real SGLang server's samples with its routes (``SAMPLES.pkl``, a pickled list of Samples).
``mismatch`` is the loop's mismatch monitor on the mismatch forward (``mismatch/moe/*`` with
record / replay).  It runs the mismatch forward (``compute_logprobs``) and ``STEPS``
``train_on`` calls of ``UPDATES`` mini-batches, each of several micro-batches, and reports
per-update loss / grad norm (rank 0).

The replay check is made from inside the MoE layers, not from the actor's bookkeeping: a forward
hook on every Megatron ``TopKRouter`` records the ``routing_map`` it returned (the experts the
dispatcher then uses), whether it ran in a forward or in a backward's recomputation
(``torch._C._current_autograd_node()``), and this script compares each call with the routes it
expects from the samples alone (the micro-batch composition the actor's contract implies:
contiguous micro-batches of ``MICRO`` samples, the DP rank's contiguous slice of a mini-batch,
width = the longest sample of the pass (rounded up to a multiple of tp under sequence
parallelism), (s, b) token order, the TP rank's sequence slice under
sequence parallelism, each stage's own layers).  Every row the engine ran (prompt + response
but the last token) must match; ``response_rows`` counts the rows whose forward gives π of a
response token.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

LAYOUTS = {
    "single": dict(tp=1, pp=1, ep=1),
    "tp2": dict(tp=2, pp=1, ep=1),          # sequence parallel (Megatron requires it for MoE + TP)
    "pp2": dict(tp=1, pp=2, ep=1),
    "ep2": dict(tp=1, pp=1, ep=2),          # EP2 x DP2, all-to-all dispatcher
}
STEPS = 1
UPDATES = 2
NUM_SAMPLES = 8
MICRO = 2
VOCAB = 128


def make_samples(num_layers: int, top_k: int, num_experts: int):
    import numpy as np
    import torch

    from drpo_megatron.samples import RoutedExperts, Sample

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(NUM_SAMPLES):
        p = 3 + int(torch.randint(0, 5, (1,), generator=g))
        r = 2 + int(torch.randint(0, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        mu = (-4.85 + 0.3 * torch.randn(r, generator=g)).tolist()
        routes = torch.stack([torch.stack([torch.randperm(num_experts, generator=g)[:top_k]
                                           for _ in range(num_layers)])
                              for _ in range(p + r - 1)])
        out.append(Sample(group_id=i // 4, prompt_ids=ids[:p], response_ids=ids[p:],
                          rollout_logp=mu, text="", finish_reason="length", weight_version="0",
                          advantage=float(torch.randn(1, generator=g)),
                          routed_experts=RoutedExperts.from_array(np.asarray(routes))))
    return out


class RouterProbe:
    """Forward hooks on the TopKRouters: per layer, the list of (in_backward, routing_map)."""

    def __init__(self, model_chunks):
        import torch

        from drpo_megatron.training.routing_replay import moe_routers

        self.calls: dict[int, list] = {}
        self.routers = moe_routers(model_chunks)
        for layer, r in self.routers:
            self.calls[layer] = []

            def hook(module, args, output, layer=layer):
                in_bwd = torch._C._current_autograd_node() is not None
                self.calls[layer].append((in_bwd, output[1].detach().clone()))
            r.register_forward_hook(hook)

    def reset(self):
        for v in self.calls.values():
            v.clear()


def check_calls(probe, batches, *, tp: int, tp_rank: int, sp: bool, top_k: int):
    """Compare every recorded router call with the samples' routes; returns counts."""
    import torch

    stats = {"forward": [0, 0], "recompute": [0, 0], "response_rows": 0, "calls": [0, 0]}
    for layer, calls in probe.calls.items():
        fwd = [m for b, m in calls if not b]
        bwd = [m for b, m in calls if b]
        for kind, seq in (("forward", fwd), ("recompute", bwd)):
            if not seq:
                continue
            assert len(seq) == len(batches), (layer, kind, len(seq), len(batches))
            stats["calls"][kind == "recompute"] += len(seq)
            for routing_map, (chunk, width) in zip(seq, batches):
                s_rows = width // tp if sp and tp > 1 else width
                lo = tp_rank * s_rows if sp and tp > 1 else 0
                b = len(chunk)
                assert routing_map.shape[0] == s_rows * b, (routing_map.shape, s_rows, b)
                used = routing_map.view(s_rows, b, -1)
                for j, smp in enumerate(chunk):
                    eng = smp.routed_experts.array()[:, layer]          # [T, K]
                    p, t = len(smp.prompt_ids), eng.shape[0]
                    for s in range(lo, lo + s_rows):
                        if s >= t:
                            continue
                        want = torch.zeros(used.shape[-1], dtype=torch.bool)
                        want[torch.as_tensor(eng[s], dtype=torch.long)] = True
                        ok = bool(torch.equal(used[s - lo, j], want))
                        stats[kind][0] += 1
                        stats[kind][1] += ok
                        if kind == "forward" and s >= p - 1:
                            stats["response_rows"] += 1
    return stats


def main(hf_dir: str, layout: str, mode: str, out: str, recompute: str = "none",
         samples_path: str = "") -> None:
    import numpy as np
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from drpo_megatron.config import LossSection, ModelConfig, OptimConfig, ParallelConfig
    from drpo_megatron.mismatch.monitor import MismatchMonitor
    from drpo_megatron.models import megatron_model as mm
    from drpo_megatron.training.actor import MegatronActor
    from drpo_megatron.training.config import ActorConfig

    lay = LAYOUTS[layout]
    t0 = time.time()
    mm.init_distributed(tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], timeout_s=120)
    actor = MegatronActor(ActorConfig(
        hf_path=hf_dir, model=ModelConfig(dtype="fp32", moe_aux_loss_coeff=0.0),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1e9, updates_per_rollout=UPDATES),
        loss=LossSection(name="drpo", aggregation="seq-mean-token-sum-norm", horizon=16),
        parallel=ParallelConfig(micro_batch_size=MICRO, use_distributed_optimizer=False,
                                recompute=recompute, **lay),
        temperature=1.0, seed=1234, routing_replay=mode))
    cfg = actor.tmodel_config
    if samples_path:  # a real engine's samples (pickled Samples with routed_experts)
        with open(samples_path, "rb") as fh:
            samples = pickle.load(fh)
    else:
        samples = make_samples(cfg.num_layers, cfg.moe_router_topk, cfg.num_moe_experts)
    probe = RouterProbe(actor.model)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    sp = bool(cfg.sequence_parallel)
    res: dict = {"layout": layout, "mode": mode, "recompute": recompute, "dp": dp,
                 "checks": [], "steps": []}

    def width(chunk):  # the longest sample, a multiple of tp under sequence parallelism
        w = max(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
        return -(-w // tp) * tp if sp else w

    # the mismatch forward: every sample, one width
    logp = actor.compute_logprobs(samples)
    w_all = width(samples)
    batches = [(samples[i: i + MICRO], w_all) for i in range(0, len(samples), MICRO)]
    if mode == "replay":
        res["checks"].append(check_calls(probe, batches, tp=tp, tp_rank=tp_rank, sp=sp,
                                         top_k=cfg.moe_router_topk))
    if mode != "off":
        rec = actor.recorded_routes()
        res["recorded_equals_engine"] = bool(rec is not None and all(
            (np.sort(r, -1) == np.sort(s.routed_experts.array()[
                len(s.prompt_ids) - 1: len(s.prompt_ids) - 1 + len(s.response_ids)][:, rec.layers],
                -1)).all()
            for r, s in zip(rec.per_sample, samples)))
        res["recorded_layers"] = None if rec is None else rec.layers
    res["logp_sum"] = float(sum(float(x.double().sum()) for x in logp))
    # the mismatch monitor of the loop on this forward (mismatch/moe/* with record / replay)
    res["mismatch"] = MismatchMonitor(actor.loss_cfg).measure(
        1, samples, logp, routes=actor.recorded_routes())
    for _ in range(STEPS):
        probe.reset()
        m = actor.train_on(samples, anchor_logp=logp)  # π_old anchor: the replayed mismatch forward
        per = len(samples) // UPDATES
        batches = []
        for u in range(UPDATES):
            mini = samples[u * per: (u + 1) * per]
            local = mini[dp_rank * (per // dp): (dp_rank + 1) * (per // dp)]
            batches += [(local[i: i + MICRO], width(mini)) for i in range(0, len(local), MICRO)]
        if mode == "replay":
            res["checks"].append(check_calls(probe, batches, tp=tp, tp_rank=tp_rank, sp=sp,
                                             top_k=cfg.moe_router_topk))
        res["steps"].append({"loss": m["loss/policy_loss"], "grad_norm": m["loss/grad_norm"],
                             "loss_first": m["loss/policy_loss_first_update"]})
    # the router kept its gradient (the last update's grads are still in the DDP buffers)
    res["router_grad_abs"] = float(sum(float(r.weight.main_grad.abs().sum())
                                       for _, r in probe.routers))
    # fresh state after the step: no target, no action, empty FIFO
    res["state_clear"] = all(
        r.router_replay.target_topk_idx is None and r.router_replay.router_replay_action is None
        and not r.router_replay.replay_backward_list
        for _, r in probe.routers if r.router_replay is not None)
    res["seconds"] = time.time() - t0
    res["checks"] = _sum_checks(res["checks"])
    gathered = [None] * dist.get_world_size() if dist.get_world_size() > 1 else [res]
    if dist.get_world_size() > 1:
        dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump({"ranks": gathered, **res}, fh)
    mm.destroy_distributed()


def _sum_checks(checks):
    tot = {"forward": [0, 0], "recompute": [0, 0], "response_rows": 0, "calls": [0, 0]}
    for c in checks:
        for k in ("forward", "recompute", "calls"):
            tot[k] = [a + b for a, b in zip(tot[k], c[k])]
        tot["response_rows"] += c["response_rows"]
    return tot


if __name__ == "__main__":
    main(*sys.argv[1:])
