"""``drpo plan CONFIG [--nodes N]``: check a cluster layout and estimate per-GPU memory.

Refuses (exit 2, one line naming the field, the value and the fix) layouts that do not divide:
attention heads and KV heads by TP, layers by PP, experts by EP, the world size
(``nodes * gpus_per_node``) by ``tp*pp`` and by ``pp*ep*etp``, the rollout mini-batch by
``dp * micro_batch_size``, GPUs per node by the rollout server's TP; and layouts whose
estimate exceeds ``parallel.gpu_memory_gb``.

Memory model (per GPU, the most loaded pipeline stage; bytes; 1 GiB = 2^30 B)
------------------------------------------------------------------------------
Parameters, split into *dense* (attention, dense MLPs, shared experts, norms, router,
embedding, LM head) and *expert* (routed experts) parameters::

    P_dense/GPU  = (L/pp) * (attn + mlp_dense + router + shared) / tp  + embed_head / tp
    P_expert/GPU = (L_moe/pp) * E * 3*h*f_moe / (ep * etp)

    attn (full)  = h*d_q + 2*h*d_kv + d_q*h              d_q = heads*head_dim, d_kv = kv_heads*head_dim
    attn (GDN)   = h*(2*nk*dk + 2*nv*dv) + 2*h*nv + 4*(2*nk*dk + nv*dv) + nv*dv*h   (Qwen3.5 linear layers)
    mlp_dense    = 3*h*f (SwiGLU); router = h*E; shared = 3*h*f_shared (+ h gate)
    embed_head   = V*h (+ V*h for the LM head unless tied; with pp > 1 the first stage holds
                   the embedding, the last the head: the larger of the two is counted)

State per parameter (Megatron DDP + Adam; the distributed optimizer shards the optimizer
state over the data-parallel group: DP = world/(tp*pp) for dense, EDP = world/(pp*ep*etp)
for expert parameters)::

    weights    w  = 2 B (bf16) | 4 B (fp32);  FP8 training: + 1 B (TE's cached e4m3 copy);
                    x 2 with loss.kl.coef > 0 (the frozen reference: weights only, no grads / Adam)
    gradients     = 4 B (fp32 grad buffer, grad_reduce_in_fp32)
    optimizer     = (4 B fp32 main copy if bf16) + 4 B Adam m + 4 B Adam v, / DP (or / EDP)
                    when use_distributed_optimizer, else not divided

Activations (bf16, flash attention: no S x S scores kept; sequence parallel divides by tp),
per token per layer, in elements::

    attn: 2h + 2*d_q + 2*d_kv      dense MLP: h + 3f      MoE: h + top_k*(h + 3*f_moe) + shared
    recompute none|selective: 2 B * that;   full: 2 B * h (only the layer input is kept)
    tokens in flight = micro_batch_size * (max_prompt_tokens + max_new_tokens) * min(pp, M)
    activations = tokens * (L/pp) * bytes_per_token_layer / tp      (M: micro-batches per update)

Log-prob buffers (the chunked vocab-parallel log-probs, chunk c = 1024)::

    3 * c * V/tp * 4 B  (fp32 chunk logits, softmax, grad)  +  2 * V/tp * h * 4 B (fp32 head + grad)

Plus a fixed 3 GiB for the CUDA context, NCCL buffers and allocator slack.

Colocated rollout (``rollout_nodes: 0`` on GPUs, or ``rollout.colocate``;
:mod:`drpo_megatron.rollout.colocate`): the servers release weights, KV cache and CUDA graphs
while the trainer trains, so training has the whole GPU (the total above); during the rollout
the trainer keeps its resident state (weights + gradients + optimizer states + overhead) next to
the servers' weights (``params * 2 B / rollout_tp``), their reserve
(``colocate.SERVER_RESERVE_GIB``) and the KV cache, which gets the rest::

    KV = budget - resident - server weights - reserve;  --mem-fraction-static = (weights + KV) / budget

refused when KV holds less than one sequence of ``max_prompt_tokens + max_new_tokens``
(K and V of every full-attention layer: ``2 * L * kv_heads/rollout_tp * head_dim * 2 B`` per token).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from drpo_megatron.errors import InputError
from drpo_megatron.models.tiny import VOCAB_SIZE
from drpo_megatron.config import ArchConfig, ConfigError, RunConfig, load_config
from drpo_megatron.models.layout import LayoutError, check_layout
from drpo_megatron.rollout.colocate import ColocationError, check_config, colocated_memory

GIB = 2 ** 30
OVERHEAD_GIB = 3.0
LOGPROB_CHUNK = 1024


class PlanError(InputError):
    """One-line refusal: field, value, fix."""


def resolve_arch(cfg: RunConfig) -> ArchConfig:
    """Architecture numbers: hf_path/config.json when it exists, else model.arch, else the
    embedded tiny model's."""
    hf = Path(cfg.model.hf_path).expanduser() if cfg.model.hf_path else None
    if hf is not None and (hf / "config.json").is_file():
        c = json.loads((hf / "config.json").read_text())
        c = c.get("text_config", c)
        fields = {f: c[f] for f in ArchConfig.model_fields if f in c}
        fields["architecture"] = (c.get("architectures") or [cfg.model.arch.architecture])[0]
        fields.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
        fields.setdefault("num_key_value_heads", c["num_attention_heads"])
        return ArchConfig(**fields)
    if cfg.model.arch.hidden_size:
        a = cfg.model.arch
        if not a.head_dim:
            a.head_dim = a.hidden_size // max(1, a.num_attention_heads)
        if not a.num_key_value_heads:
            a.num_key_value_heads = a.num_attention_heads
        for name in ("num_hidden_layers", "num_attention_heads", "vocab_size"):
            if getattr(a, name) <= 0:
                raise PlanError(f"model.arch.{name}={getattr(a, name)} must be > 0; copy it from "
                                "the checkpoint's config.json")
        return a
    if not cfg.model.hf_path:
        t = cfg.model.tiny
        return ArchConfig(architecture="Qwen3MoeForCausalLM", hidden_size=t.hidden_size,
                          num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                          num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                          vocab_size=VOCAB_SIZE, num_experts=t.num_experts,
                          num_experts_per_tok=t.top_k, moe_intermediate_size=t.moe_intermediate_size)
    raise PlanError(f"model.hf_path={cfg.model.hf_path!r} has no config.json here and model.arch is "
                    "empty; fill model.arch (hidden_size, num_hidden_layers, ...) from config.json")


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    params_total: int
    params_dense_per_gpu: float
    params_expert_per_gpu: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logprob_gib: float
    overhead_gib: float
    total_gib: float
    budget_gib: float
    micro_batches_per_update: int

    def table(self) -> str:
        rows = [("weights", self.weights_gib), ("gradients", self.grads_gib),
                ("optimizer states", self.optimizer_gib), ("activations", self.activations_gib),
                ("log-prob buffers", self.logprob_gib), ("overhead", self.overhead_gib),
                ("total", self.total_gib)]
        lines = [f"layout: world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp}; "
                 f"experts ep {self.ep} x etp {self.etp} x edp {self.expert_dp}",
                 f"parameters: {self.params_total / 1e9:.2f} B total; per GPU "
                 f"{self.params_dense_per_gpu / 1e9:.3f} B dense + {self.params_expert_per_gpu / 1e9:.3f} B expert",
                 f"micro-batches per optimizer step per DP rank: {self.micro_batches_per_update}",
                 "per-GPU memory estimate (GiB):"]
        lines += [f"  {k:<17}{v:9.2f}" for k, v in rows]
        lines.append(f"  {'budget':<17}{self.budget_gib:9.2f}  -> "
                     f"{'fits' if self.total_gib <= self.budget_gib else 'DOES NOT FIT'}")
        return "\n".join(lines)


def _layer_params(a: ArchConfig) -> tuple[float, float, float, float, float]:
    """(full-attn, GDN-attn, dense-MLP, MoE dense part (router+shared), experts) per layer."""
    h = a.hidden_size
    d_q, d_kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    full = h * d_q + 2 * h * d_kv + d_q * h + 2 * h  # + input/post norms
    nk, nv, dk, dv = (a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim,
                      a.linear_value_head_dim)
    gdn = h * (2 * nk * dk + 2 * nv * dv) + 2 * h * nv + 4 * (2 * nk * dk + nv * dv) + nv * dv * h + 2 * h
    mlp = 3 * h * a.intermediate_size
    moe_dense = h * a.num_experts + (3 * h * a.shared_expert_intermediate_size + h
                                     if a.shared_expert_intermediate_size else 0)
    experts = a.num_experts * 3 * h * a.moe_intermediate_size
    return full, gdn, mlp, moe_dense, experts


def make_plan(cfg: RunConfig, nodes: int | None = None) -> Plan:
    par = cfg.parallel
    if nodes is not None:
        if nodes < 1:
            raise PlanError(f"--nodes={nodes} must be >= 1")
        par.num_nodes = nodes
    a = resolve_arch(cfg)
    tp, pp, ep = par.tp, par.pp, par.ep
    etp = tp if par.etp is None else par.etp
    world = par.world_size
    L = a.num_hidden_layers
    moe = a.num_experts > 0
    # --- divisibility: the one layout check (models/layout.py), on the numbers after --nodes
    try:
        check_layout(tp=tp, pp=pp, ep=ep, etp=par.etp, world=world,
                     num_attention_heads=a.num_attention_heads,
                     num_key_value_heads=a.num_key_value_heads, num_layers=L,
                     num_experts=a.num_experts, model=a.architecture or "the model")
    except LayoutError as e:
        raise PlanError(str(e)) from None
    if par.gpus_per_node % par.rollout_tp:
        raise PlanError(f"parallel.rollout_tp={par.rollout_tp} does not divide "
                        f"parallel.gpus_per_node={par.gpus_per_node}; a server must fit in one node")
    if a.num_attention_heads % par.rollout_tp:
        raise PlanError(f"parallel.rollout_tp={par.rollout_tp}: num_attention_heads="
                        f"{a.num_attention_heads} is not divisible by it")
    dp = world // (tp * pp)
    edp = world // (pp * ep * etp)
    r = cfg.rollout
    seqs = r.prompts_per_step * r.samples_per_prompt // cfg.optim.updates_per_rollout
    if seqs % (dp * par.micro_batch_size):
        raise PlanError(f"parallel.micro_batch_size={par.micro_batch_size}: the mini-batch of {seqs} "
                        f"sequences (rollout.prompts_per_step*samples_per_prompt/updates_per_rollout) "
                        f"is not divisible by dp*micro_batch_size={dp * par.micro_batch_size}; change "
                        "the node count, micro_batch_size or the batch sizes")
    n_micro = seqs // (dp * par.micro_batch_size)
    # --- parameters
    full, gdn, mlp, moe_dense, experts = _layer_params(a)
    n_full = L if a.full_attention_interval <= 1 else L // a.full_attention_interval
    attn_total = n_full * full + (L - n_full) * gdn
    h, V = a.hidden_size, a.vocab_size
    embed, head = V * h, (0 if a.tie_word_embeddings else V * h)
    dense_layers = attn_total + (L * moe_dense if moe else L * mlp)
    expert_total = L * experts if moe else 0
    params_total = int(dense_layers + expert_total + embed + head)
    eh = (embed + head) if pp == 1 else max(embed, V * h)
    p_dense = dense_layers / pp / tp + eh / tp
    p_exp = expert_total / pp / (ep * etp)
    # --- bytes
    w = 2 if cfg.model.dtype == "bf16" else 4
    if cfg.model.fp8:
        w += 1
    opt = (4 if cfg.model.dtype == "bf16" else 0) + 8
    dist_opt = par.use_distributed_optimizer
    weights = (p_dense + p_exp) * w * (2 if cfg.loss.kl.enabled else 1)  # + frozen KL reference
    grads = (p_dense + p_exp) * 4
    optim = p_dense * opt / (dp if dist_opt else 1) + p_exp * opt / (edp if dist_opt else 1)
    d_q, d_kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    if par.recompute == "full":
        per_tok_layer = 2 * h
    else:
        mlp_act = (h + a.num_experts_per_tok * (h + 3 * a.moe_intermediate_size)
                   + 3 * a.shared_expert_intermediate_size) if moe else h + 3 * a.intermediate_size
        per_tok_layer = 2 * (2 * h + 2 * d_q + 2 * d_kv + mlp_act)
    seq = (cfg.task.max_prompt_tokens or 0) + r.max_new_tokens
    tokens = par.micro_batch_size * seq * min(pp, n_micro)
    acts = tokens * (L / pp) * per_tok_layer / tp
    logprob = 3 * LOGPROB_CHUNK * V / tp * 4 + 2 * V / tp * h * 4
    total = (weights + grads + optim + acts + logprob) / GIB + OVERHEAD_GIB
    return Plan(world_size=world, tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, expert_dp=edp,
                params_total=params_total, params_dense_per_gpu=p_dense, params_expert_per_gpu=p_exp,
                weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=optim / GIB,
                activations_gib=acts / GIB, logprob_gib=logprob / GIB, overhead_gib=OVERHEAD_GIB,
                total_gib=total, budget_gib=par.gpu_memory_gb, micro_batches_per_update=n_micro)


def check_fits(p: Plan, cfg: RunConfig) -> None:
    if p.total_gib > p.budget_gib:
        parts = {"optimizer states": p.optimizer_gib, "weights": p.weights_gib,
                 "gradients": p.grads_gib, "activations": p.activations_gib}
        big = max(parts, key=parts.get)
        fix = {"activations": "set parallel.recompute: full, lower parallel.micro_batch_size or raise tp/pp",
               }.get(big, "raise parallel.tp/pp/ep, keep use_distributed_optimizer: true, or add nodes")
        raise PlanError(f"parallel.gpu_memory_gb={p.budget_gib:g}: estimate {p.total_gib:.1f} GiB per GPU "
                        f"does not fit (largest: {big} {parts[big]:.1f} GiB); {fix}")


def colocated(p: Plan, cfg: RunConfig):
    """The colocated memory split (``rollout/colocate.ColocatedMemory``) when the rollout servers
    share the trainer's GPUs on a GPU cluster config; None otherwise."""
    par = cfg.parallel
    if par.rollout_nodes or not (par.device == "cuda" or cfg.rollout.colocate):
        return None
    try:
        check_config(cfg, source="rollout.colocate" if cfg.rollout.colocate
                     else "parallel.rollout_nodes=0 (colocated)")
        return colocated_memory(p, resolve_arch(cfg), cfg)
    except ColocationError as e:
        raise PlanError(str(e)) from None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drpo plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML run config (model_configs/*.yaml)")
    ap.add_argument("--nodes", type=int, default=None, help="trainer nodes (overrides parallel.num_nodes)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        if args.nodes is not None and args.nodes < 1:
            raise PlanError(f"--nodes={args.nodes} must be >= 1")
        # --nodes is applied before any check: the layout is validated once, for the node
        # count that will run (not the YAML's own parallel.num_nodes)
        overrides = {"parallel": {"num_nodes": args.nodes}} if args.nodes is not None else None
        cfg = load_config(args.config, overrides)
        p = make_plan(cfg)
        colo = colocated(p, cfg)
        if args.json:
            print(json.dumps({**asdict(p), "colocated": asdict(colo) if colo else None}, indent=1))
        else:
            print(p.table() + (f"\n{colo.line()}" if colo else ""))
        check_fits(p, cfg)
    except (ConfigError, PlanError) as e:
        print(f"drpo plan: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["Plan", "PlanError", "make_plan", "check_fits", "colocated", "resolve_arch", "main"]


def colocated_mem_fraction(cfg: RunConfig) -> float | None:
    """``--mem-fraction-static`` of this run's colocated servers: the share of a GPU the plan
    leaves them (rollout/colocate.py's ``colocated_memory``)."""
    return colocated_memory(make_plan(cfg), resolve_arch(cfg), cfg).mem_fraction_static
