"""The Megatron-Core actor: forward log-probs, the policy-loss train step, weight export.

Built from :class:`ActorConfig`; holds the Megatron model chunks, the Megatron optimizer and the
megatron-bridge handle (HF <-> Megatron names).  Log-probs are computed in fp32 from
``logits / temperature`` for response tokens only (SGLang returns log-probs of the tempered
distribution): the model's ``output_processor`` hook hands us the final hidden states and the
LM-head weight shard, and :func:`drpo_megatron.training.logprobs.vocab_parallel_logprobs`
computes the log-probs of the response positions in token chunks (vocab-parallel, logits
recomputed in backward), so the [tokens, vocab] logits are never materialised.

Data parallelism: every rank receives the whole mini-batch; data-parallel rank r trains on the
r-th contiguous slice (``len(samples)`` must be divisible by the DP size, so all DP/EP ranks run
the same number of micro-batches).  Token and sequence counts are all-reduced over the DP group:
the loss denominators are global.

Loss scaling contract with Megatron's schedule and DDP: our per-micro-batch loss is already
normalised by *global* denominators (all micro-batches and data-parallel ranks of one optimizer
step; see ``drpo_megatron.algorithms.aggregate_loss``), so the sum of micro-batch losses over the
step is the step loss.  Megatron's forward-backward divides each micro-batch loss by
``num_microbatches`` and DDP averages gradients over the data-parallel group; the loss function
multiplies by both factors so the gradient equals that of the global step loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from drpo_megatron.algorithms import POLICY_LOSSES, add_loss_terms, aggregate_loss, reduce_metrics
from drpo_megatron.algorithms.losses import LOSS_EXTRAS
from drpo_megatron.dist import share
from drpo_megatron.models import megatron_model as mm
from drpo_megatron.models.fp8_config import PrecisionConfig
from drpo_megatron.samples import Sample
from drpo_megatron.training import checkpoint as ckpt
from drpo_megatron.training.batch import MicroBatch, pack_samples
from drpo_megatron.training.config import ActorConfig
from drpo_megatron.training.logprobs import vocab_parallel_logprobs
from drpo_megatron.training.routing_replay import RouterControl
from drpo_megatron.weights.hf_export import precision_transform

log = logging.getLogger(__name__)

#: train_on reports these as counts over the step's updates (the others as means)
SUMMED_OVER_UPDATES = ("loss/nonfinite_skipped",)




def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _pp_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[target] in fp32, vocab-parallel under TP.

    logits: [B, S, V/tp] (this rank's vocab shard), targets: [B, S] global token ids.
    Returns [B, S] fp32, differentiable w.r.t. logits.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature  # a new tensor: the CE kernel modifies its input in place
    return -vocab_parallel_cross_entropy(scaled, targets)


class MegatronActor:
    """The policy being trained, built from :class:`ActorConfig` (the run config's ``model``,
    ``parallel``, ``optim`` and ``loss`` sections); ``pad_id`` pads micro-batches (it never
    enters the loss: padding is masked)."""

    def __init__(self, cfg: ActorConfig, pad_id: int = 0):
        self.cfg = cfg
        self.pad_id = pad_id
        self.loss_fn = POLICY_LOSSES[cfg.loss.name]
        self.loss_cfg = cfg.loss.policy
        par, optim = cfg.parallel, cfg.optim
        t0 = time.time()
        overrides = ({} if cfg.model.moe_aux_loss_coeff is None else
                     {"moe_aux_loss_coeff": cfg.model.moe_aux_loss_coeff})
        if cfg.routing_replay == "replay":  # a RouterReplay per TopKRouter (routing_replay.py)
            overrides["moe_enable_routing_replay"] = True
        self.bridge, self.provider, self.model = mm.load_policy_from_hf(
            cfg.hf_path, dtype=cfg.model.dtype, tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp,
            seq_parallel=par.sequence_parallel, wrap_ddp=True,
            use_distributed_optimizer=par.use_distributed_optimizer, seed=cfg.seed,
            overrides=overrides or None, fp8=_precision(cfg), recompute=par.recompute)
        self.optimizer = mm.build_optimizer(
            self.model, lr=optim.lr, weight_decay=optim.weight_decay, grad_clip=optim.grad_clip,
            adam_betas=(optim.adam_beta1, optim.adam_beta2),
            use_distributed_optimizer=par.use_distributed_optimizer)
        self._entropy: dict[int, torch.Tensor] = {}
        # DPPO top-K: the loss needs µ's top-K log-probs and π's at the same ids (LOSS_EXTRAS)
        self._needs_topk = "topk_logp" in LOSS_EXTRAS.get(cfg.loss.name, ())
        self._topk: dict[int, torch.Tensor] = {}
        # routing replay (R3): None when rollout.routing_replay is off (no hooks at all)
        self.routing = None if cfg.routing_replay == "off" else RouterControl(
            self.model, cfg.routing_replay, tp_group=_tp_group(), pp_group=_pp_group(),
            sequence_parallel=bool(self.provider.sequence_parallel))
        log.info("actor ready: %s, %.2fM params, %.1fs", cfg.loss.name,
                 sum(p.numel() for m in self.model for p in m.parameters()) / 1e6, time.time() - t0)

    # ------------------------------------------------------------------ helpers
    @property
    def tmodel_config(self):
        from megatron.core.utils import get_model_config

        return get_model_config(self.model[0])

    def _forward_logp(self, model, mb: MicroBatch, temperature: float) -> torch.Tensor:
        """[B, S] fp32 log-probs of the targets at ``temperature``, 0 outside ``mb.loss_mask``
        (last PP stage; other stages return their hidden states for the next one)."""
        mask = mm.causal_attention_mask(mb.tokens.shape[1])
        if self.routing is not None:  # replay: this micro-batch's targets; record: capture
            self.routing.before_forward(mb)
        if self.cfg.logprob_impl == "logits":
            logits = model(mb.tokens, mb.position_ids, mask)  # [B, S, V/tp]
            out = token_logprobs(logits, mb.targets, temperature)
        else:
            def processor(*, hidden_states, output_layer, output_weight, **_):
                return self._response_logp(hidden_states, output_layer, output_weight, mb,
                                           temperature)

            out = model(mb.tokens, mb.position_ids, mask, output_processor=processor)
        if self.routing is not None:
            self.routing.after_forward(mb, out)
        return out

    def _response_logp(self, hidden, output_layer, output_weight, mb: MicroBatch,
                       temperature: float) -> torch.Tensor:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region)

        weight = output_weight if output_weight is not None else output_layer.weight
        tp_group = ps.get_tensor_model_parallel_group()
        # Same input mapping as the ColumnParallelLinear LM head: its backward sums the hidden
        # gradient over TP (reduce-scatter under sequence parallelism, all-reduce otherwise).
        if getattr(output_layer, "sequence_parallel", False):
            hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)   # [S, B, H]
        elif ps.get_tensor_model_parallel_world_size() > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
        sel = mb.loss_mask
        h = hidden.transpose(0, 1)[sel]                                # [N, H], (b, s) order
        extra = {} if mb.topk_ids is None else {"extra_ids": mb.topk_ids[sel]}
        logp, entropy, *topk = vocab_parallel_logprobs(
            h, weight, mb.targets[sel], temperature=temperature,
            chunk_size=self.cfg.logprob_chunk_size, group=tp_group, reduce_hidden_grad=False,
            **extra)
        self._entropy[id(mb)] = entropy
        if topk:  # π's log-probs at µ's top-K ids [N, K] (DPPO top-K), same chunked pass
            self._topk[id(mb)] = topk[0]
        out = torch.zeros(sel.shape, dtype=torch.float32, device=logp.device)
        return out.masked_scatter(sel, logp)

    def _micro_batches(self, samples: Sequence[Sample], first_seq_id: int = 0,
                       with_routes: bool = False):
        width = self._padded_width(max(len(s.prompt_ids) + len(s.response_ids) for s in samples))
        mbs = []
        mbsz = self.cfg.parallel.micro_batch_size
        for i in range(0, len(samples), mbsz):
            chunk = samples[i: i + mbsz]
            mbs.append(pack_samples(chunk, pad_id=self.pad_id, seq_len=width,
                                    first_seq_id=first_seq_id + i, with_routes=with_routes))
        return mbs, width

    def _padded_width(self, width: int) -> int:
        """``width`` rounded up to a multiple of the TP size under sequence parallelism (Megatron
        splits the sequence over the TP ranks and asserts it divides; the extra positions are
        padding, outside the loss)."""
        tp = self.cfg.parallel.tp
        if tp > 1 and self.provider.sequence_parallel:
            return -(-width // tp) * tp
        return width

    def _routing_step(self, samples: Sequence[Sample], *, capture: bool = False):
        """Routing replay around one collective pass (yields whether the micro-batches must
        carry the engine's routes: replay); a no-op context without it."""
        if self.routing is None:
            return contextlib.nullcontext(False)
        return self.routing.step(samples, capture=capture)

    def recorded_routes(self):
        """The trainer's routing of the last mismatch forward (``compute_logprobs`` on samples
        with the engine's routes) as :class:`~drpo_megatron.training.routing_replay.
        TrainerRoutes`; None without routing replay."""
        return None if self.routing is None else self.routing.last

    def _run(self, forward_step, mbs: list[MicroBatch], width: int, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=self.model,
                  num_microbatches=len(mbs), seq_length=width,
                  micro_batch_size=mbs[0].tokens.shape[0], forward_only=forward_only)

    # ------------------------------------------------------------------ log-probs (no grad)
    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[Sample], *,
                         temperature: float | None = None) -> list[torch.Tensor]:
        """Current-policy log-probs of each sample's response tokens: list of [len(response)]
        fp32, from logits / ``temperature`` (default: the rollout temperature of the config;
        the post-sync check asks for 1.0).  Collective under model parallelism; under PP every
        stage returns the last stage's values."""
        temperature = self.cfg.temperature if temperature is None else temperature
        for m in self.model:
            m.eval()
        results: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            logp = self._forward_logp(model, mb, temperature)

            def collect(output):
                rows = [output[b][mb.loss_mask[b]].detach().clone() for b in range(output.shape[0])]
                results.extend(rows)
                return output.sum() * 0.0, {}

            return logp, collect

        with self._routing_step(samples, capture=True) as routed:
            mbs, width = self._micro_batches(samples, with_routes=routed)
            self._run(forward_step, mbs, width, forward_only=True)
        self._entropy.clear()
        for m in self.model:
            m.train()
        return _from_last_stage(results)

    # ------------------------------------------------------------------ one optimizer step
    def train_on(self, samples: Sequence[Sample], *,
                 anchor_logp: Sequence[torch.Tensor] | None = None,
                 ref_logp: Sequence[torch.Tensor] | None = None,
                 old_logp: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
        """One rollout step's updates: ``optim.updates_per_rollout`` optimizer steps, each on a
        contiguous mini-batch of whole prompt groups (``samples`` is group-major and
        ``prompts_per_step`` is divisible by the update count).

        ``anchor_logp``: π_old per sample (the caller computed it before any update of this step)
        when the loss config says ``anchor: old_policy``; None = anchor on the rollout's µ.  The
        choice is the caller's, from the typed loss config: never switched here.  ``ref_logp``
        (the reference policy's, with ``loss.kl`` in the loss) and ``old_logp`` (π_old, with a
        ``loss.correction``) per sample likewise.  Returns the
        mean over updates of each metric (``loss/nonfinite_skipped``: the count of updates
        skipped for a non-finite loss or gradient), plus ``loss/policy_loss_first_update``."""
        k = self.cfg.optim.updates_per_rollout
        per = len(samples) // k
        reports = []
        for u in range(k):
            sl = slice(u * per, (u + 1) * per)
            reports.append(self.train_step(
                samples[sl], anchor_logp=None if anchor_logp is None else anchor_logp[sl],
                ref_logp=None if ref_logp is None else ref_logp[sl],
                old_logp=None if old_logp is None else old_logp[sl]))
        out: dict[str, float] = {}
        for key in reports[0]:
            vals = [r[key] for r in reports if key in r]
            out[key] = sum(vals) if key in SUMMED_OVER_UPDATES else sum(vals) / len(vals)
        out["loss/policy_loss_first_update"] = reports[0].get("loss/policy_loss", float("nan"))
        return out

    def train_step(self, samples: Sequence[Sample], *,
                   anchor_logp: Sequence[torch.Tensor] | None = None,
                   ref_logp: Sequence[torch.Tensor] | None = None,
                   old_logp: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step on ``samples`` (a mini-batch of whole prompt groups).

        ``anchor_logp``: per-sample anchor log-probs replacing the rollout's µ (the recomputed
        π_old anchor); None = anchor on the rollout engine's log-probs.

        ``loss.kl`` in the loss / ``loss.correction`` (``add_loss_terms``): ``ref_logp`` = the
        reference policy's per-sample log-probs, ``old_logp`` = π_old's (recomputed before the
        step's first update; the correction's ρ = π_old / µ against the rollout's µ).

        Samples with ``in_loss`` False (``rollout.overlong: filter``) are masked out of the loss
        and its token / sequence denominators.  Top-K losses (DPPO top-K) get their extras:
        ``topk_logp`` = µ's top-K log-probs from the engine, ``topk_logp_policy`` = π's
        log-probs at the same ids (computed in the chunked vocab-parallel log-prob pass),
        ``sampled_in_topk``.
        """
        if self._needs_topk and anchor_logp is not None:
            raise ValueError(f"loss {self.cfg.loss.name!r} with the old_policy anchor: the top-K "
                             "buckets come from the rollout engine (µ); π_old's top-K is not "
                             "computed. Use the rollout anchor for top-K losses")
        if self._needs_topk and self.cfg.logprob_impl != "chunked":
            raise ValueError(f"loss {self.cfg.loss.name!r} needs logprob_impl='chunked' (the "
                             "top-K policy log-probs are computed in the chunked pass)")
        terms = _loss_term_inputs(self.cfg)  # loss.kl in the loss / loss.correction
        given = {"ref_logp": ref_logp, "old_logp": old_logp,
                 "rollout_logp": [s.rollout_logp for s in samples]}  # µ, before an anchor swap
        missing = sorted(k for k in terms if given[k] is None)
        if missing:
            raise ValueError(f"train_step: loss.kl / loss.correction need {missing}")
        if anchor_logp is not None:
            samples = [Sample(**{**s.__dict__, "rollout_logp": a.tolist()})
                       for s, a in zip(samples, anchor_logp)]
        dp = mm.data_parallel_world_size()
        dp_rank = _dp_rank() if dp > 1 else 0
        if len(samples) % dp:
            raise ValueError(f"{len(samples)} samples do not split evenly over {dp} data-parallel "
                             "ranks (prompts per mini-batch x samples per prompt must be a "
                             "multiple of the DP size)")
        per_rank = len(samples) // dp
        width = self._padded_width(
            _all_reduce_max(max(len(s.prompt_ids) + len(s.response_ids) for s in samples), dp))
        first = dp_rank * per_rank
        local = samples[first: first + per_rank]
        mbsz = self.cfg.parallel.micro_batch_size
        routed = (self.routing is not None and self.routing.mode == "replay"
                  and self.routing.samples_carry_routes(samples))
        mbs = [pack_samples(local[i: i + mbsz], pad_id=self.pad_id, seq_len=width,
                            first_seq_id=first + i, with_topk=self._needs_topk,
                            with_routes=routed)
               for i in range(0, len(local), mbsz)]
        num_mb = len(mbs)
        # per-token tensors of loss.kl / loss.correction, packed like the micro-batch's µ
        per_mb_terms = {
            id(mb): {k: _pack_rows(mb.loss_mask, given[k][first + i:first + i + len(mb.tokens)])
                     for k in terms}
            for i, mb in zip(range(0, len(local), mbsz), mbs)}
        # global denominators: all micro-batches of all data-parallel ranks of this step
        global_tokens, global_seqs = _all_reduce_sum(
            [float(sum(mb.num_tokens for mb in mbs)), float(sum(mb.num_seqs for mb in mbs))], dp)

        def loss_func(mb: MicroBatch, logp_full: torch.Tensor):
            m = mb.loss_mask
            logp = logp_full[m]
            in_loss = mb.train_mask[m]  # False: tokens of samples excluded (overlong: filter)
            extra = {}
            if self._needs_topk:
                ids = mb.topk_ids[m]
                extra = {"topk_logp": mb.topk_logp[m], "topk_logp_policy": self._topk.pop(id(mb)),
                         "sampled_in_topk": (ids == mb.targets[m].unsqueeze(-1)).any(-1)}
            per_token, metrics = self.loss_fn(
                logp, mb.rollout_logp[m], mb.advantages[m], in_loss,
                self.loss_cfg, seq_ids=mb.seq_ids[m], **extra)
            if terms:  # c_t * loss_t + beta * KL_t (loss.correction / loss.kl in the loss)
                per_token, more = add_loss_terms(
                    per_token, logp, in_loss, anchor=self.loss_cfg.anchor, kl=self.cfg.loss.kl,
                    correction=self.cfg.loss.correction.config, seq_ids=mb.seq_ids[m],
                    **{k: v[m] for k, v in per_mb_terms.pop(id(mb)).items()})
                metrics = {**metrics, **more}
            loss = aggregate_loss(per_token, in_loss,
                                  self.cfg.loss.aggregation, seq_ids=mb.seq_ids[m],
                                  global_num_tokens=global_tokens, global_num_seqs=global_seqs,
                                  horizon=self.cfg.loss.horizon)
            report = {k: float(v) for k, v in metrics.items()}
            ent = self._entropy.pop(id(mb), None)
            if ent is not None and ent.numel():
                report["loss/entropy"] = float(ent.mean())
            report["loss/policy_loss"] = float(loss.detach())  # summed over micro-batches below
            return loss * num_mb * dp, report

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return self._forward_logp(model, mb, self.cfg.temperature), partial(loss_func, mb)

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self._routing_step(samples):
            reports = self._run(forward_step, mbs, width, forward_only=False)
        self._entropy.clear()
        self._topk.clear()
        out = _merge_reports(reports)
        # the step loss on every rank: sum over PP stages (only the last has it) and DP ranks
        out["loss/policy_loss"] = _global_loss_sum(out.get("loss/policy_loss", 0.0))
        if not self._finite(out["loss/policy_loss"]):
            # a NaN/inf loss or gradient never reaches the weights (nor Adam's moments): the
            # update is skipped on every rank and counted; the loop decides when to stop
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            out.update({"loss/grad_norm": float("nan"), "loss/update_skipped": 1.0,
                        "loss/nonfinite_skipped": 1.0})
            return out
        ok, grad_norm, _ = self.optimizer.step()
        out["loss/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["loss/update_skipped"] = 0.0 if ok else 1.0
        out["loss/nonfinite_skipped"] = 0.0
        return out

    def _finite(self, loss: float) -> bool:
        """True when the step loss and every rank's gradients are finite (collective: the
        answer is the same on every rank)."""
        bad = not math.isfinite(loss)
        if not bad:
            for chunk in self.model:
                for p in chunk.parameters():
                    g = getattr(p, "main_grad", None)
                    g = p.grad if g is None else g
                    if g is not None and not torch.isfinite(g).all():
                        bad = True
                        break
                if bad:
                    break
        return not _any_rank(bad)

    # ------------------------------------------------------------------ weights out
    def named_hf_tensors(self, precision: str = "bf16"):
        """The current weights as a stream of ``(hf_name, full tensor)``, transformed for the
        rollout ``precision`` (``weights.hf_export.precision_transform``).  Collective under model
        parallelism: every rank must iterate it to the end (rank 0 sends)."""
        named = mm.export_hf_state_dict(self.bridge, self.model)
        transform = precision_transform(precision)
        return transform(named) if transform is not None else named

    def export_hf(self, out_dir: str | Path, precision: str = "bf16") -> Path:
        """Write the current weights as an HF checkpoint (safetensors + config + tokenizer),
        transformed for the rollout ``precision`` (see ``weights.hf_export``).  Collective under
        model parallelism: every rank iterates the gathered tensors, rank 0 writes."""
        return mm.save_hf_checkpoint(self.bridge, self.model, out_dir,
                                           copy_from=self.cfg.hf_path, precision=precision)

    def save_checkpoint(self, out_dir: str | Path, step: int,
                        extra_state: dict[str, Any] | None = None) -> Path:
        """Model + optimizer + RNG states (+ ``extra_state``: the trainer's data cursor ...),
        written atomically with dist_checkpointing (collective)."""
        return ckpt.save_megatron_checkpoint(self.model, self.optimizer, out_dir, step=step,
                                             extra_state=extra_state)

    def load_checkpoint(self, ckpt_dir: str | Path) -> tuple[int, dict[str, Any]]:
        """Load a :meth:`save_checkpoint` directory (any parallel layout) into the model and
        optimizer and restore this rank's RNG states; returns ``(step, extra_state)``."""
        step = ckpt.load_megatron_checkpoint(self.model, self.optimizer, ckpt_dir)
        return step, ckpt.load_trainer_state(ckpt_dir)


def _loss_term_inputs(cfg: ActorConfig) -> tuple[str, ...]:
    """The per-token inputs of the loop's loss terms (``add_loss_terms``): ``ref_logp`` for
    loss.kl in the loss, ``old_logp`` (π_old) and ``rollout_logp`` (µ) for loss.correction;
    empty = the plain policy loss."""
    out: tuple[str, ...] = ()
    if cfg.loss.kl.in_loss:
        out += ("ref_logp",)
    if cfg.loss.correction.kind != "none":
        out += ("old_logp", "rollout_logp")
    return out


def _pack_rows(loss_mask: torch.Tensor, rows: Sequence) -> torch.Tensor:
    """[B, S] fp32 with row b's per-response-token values at ``loss_mask[b]`` (0 elsewhere)."""
    out = torch.zeros(loss_mask.shape, dtype=torch.float32)
    flat = [torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r in rows]
    out[loss_mask] = torch.cat(flat) if flat else torch.zeros(0)
    return out


def _from_last_stage(results: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under pipeline parallelism only the last stage computes log-probs; every stage gets
    them (broadcast over the pipeline group), so the mismatch monitor, the π_old anchor and the
    sync check see the same values on every rank."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return results
    return share(results, src=ps.get_pipeline_model_parallel_last_rank(),
                 group=ps.get_pipeline_model_parallel_group())


def _precision(cfg: ActorConfig):
    if not cfg.model.fp8:
        return None
    return PrecisionConfig.from_setting(cfg.model.dtype, cfg.model.fp8)


def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def _all_reduce_sum(values: list[float], dp: int) -> list[float]:
    if dp == 1:
        return values
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def _all_reduce_max(value: int, dp: int) -> int:
    if dp == 1:
        return value
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(t.item())


def _any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank of the job."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _global_loss_sum(local: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    from megatron.core import parallel_state as ps

    t = torch.tensor([local], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return float(t.item())


def _merge_reports(reports: list[dict[str, float]] | None) -> dict[str, float]:
    """Per-micro-batch loss metrics combined by ``reduce_metrics`` (token-weighted means, summed
    counts, min/max); ``loss/policy_loss`` is the sum of the micro-batch contributions."""
    if not reports:
        return {}
    total = sum(r["loss/policy_loss"] for r in reports)
    out = reduce_metrics([{k: v for k, v in r.items() if k != "loss/policy_loss"} for r in reports])
    out["loss/policy_loss"] = total
    return out
