"""Routing replay (R3), trainer side: force the MoE routers through the rollout engine's experts,
or record the trainer's own routing next to the engine's.

``rollout.routing_replay`` (:data:`RoutingReplayMode`):

* ``off``: nothing (no hooks, Megatron's router untouched).
* ``record``: the engine's routes travel with the samples; the mismatch forward (π before any
  update, ``compute_logprobs``) captures the experts each router really used (a forward hook on
  Megatron's ``TopKRouter``: its ``routing_map``), and the mismatch monitor compares them with the
  engine's (``mismatch/moe/*``, per layer).  Nothing is forced.
* ``replay``: every forward of the step on samples that carry routes (the mismatch forward,
  every mini-batch update, π_old) uses the engine's experts for every token the engine ran
  (prompt and response: the response's hidden states attend to the prompt's, so replaying only
  the response would still let the prompt's sub-network differ).  The routing still happens in
  Megatron's router, through megatron-core 0.19.2's own replay: ``moe_enable_routing_replay``
  gives each ``TopKRouter`` a ``RouterReplay``; before each micro-batch's forward we give it that
  micro-batch's target ids (``set_target_indices``) and the ``REPLAY_FORWARD`` action, under
  which the router gathers its gate scores at the replayed experts (``scores.gather(1,
  target)``): the probabilities, hence the router's gradient, are the router's own.  The same
  capture hook reports the routing used (``mismatch/moe/*`` = 0 when replay works).

Layouts:

* token order: the router sees [S_local, B, H] and flattens it (s, b)-major, so a micro-batch's
  target for one layer is ``routes[:, :, layer].transpose(0, 1)`` [S, B, K] flattened the same
  way; under sequence parallelism the TP rank r holds rows ``[r S/tp, (r+1) S/tp)`` of S (the
  embedding's scatter), and gets exactly that slice.
* pipeline parallelism: each stage's routers carry their global ``layer_number`` (1-based, offset
  included): each takes the engine's layer ``layer_number - 1``.
* expert parallelism (all-to-all dispatcher): routing happens before the dispatch, on the rank's
  own tokens; padding positions and the last token (which the engine never ran) get the filler
  experts ``0..K-1`` (``training/batch.py``: distinct and valid, so the dispatcher's token
  counts stay consistent on every rank; their outputs never reach the loss).
* activation recompute: ``RouterReplay`` keeps every target it was given in a FIFO
  (``replay_backward_list``) and pops it under the ``REPLAY_BACKWARD`` action.  A gradient hook
  on each micro-batch's forward output switches the routers to ``REPLAY_BACKWARD`` when that
  micro-batch's backward starts, so its recomputed forward pops its own targets; the next
  forward switches back.  Backward runs micro-batches in forward order under every Megatron
  schedule (1F1B included), which is the order of the FIFO.
* a fresh state every step: each ``compute_logprobs`` / ``train_step`` starts from cleared
  targets and ends with the routers' action cleared, so a forward outside replay (the post-sync
  probe, samples without routes) routes natively.

Why ``RouterReplay`` is driven per instance and not through its static helpers
(``RouterReplay.set_replay_data``): those walk a process-global list of every router ever built,
which also holds the routers of any other model built in the process (tests, a reference model),
and then refuse the layer count.  We drive the instances of our own model chunks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from drpo_megatron.samples import Sample

#: rollout.routing_replay: nothing | compare the trainer's routing with the engine's | force the
#: engine's experts in every forward of the step
RoutingReplayMode = Literal["off", "record", "replay"]


@dataclass
class TrainerRoutes:
    """The experts the trainer's routers used for each sample's response tokens, gathered over
    TP and PP: ``layers`` = the engine layer index of each MoE layer (sorted), ``per_sample[i]`` =
    int array [len(response_ids), len(layers), K] (row k: the forward that computes π of
    response token k)."""

    layers: list[int]
    per_sample: list[np.ndarray]


def moe_routers(model_chunks: Sequence[torch.nn.Module]) -> list[tuple[int, torch.nn.Module]]:
    """``(engine layer index, TopKRouter)`` of every MoE layer of this rank's model chunks,
    sorted by layer (MTP layers excluded: the engine does not report them)."""
    from megatron.core.transformer.moe.router import TopKRouter

    out = []
    for chunk in model_chunks:
        for name, m in chunk.named_modules():
            if isinstance(m, TopKRouter) and ".mtp." not in f".{name}.":
                if m.layer_number is None:
                    raise RuntimeError(f"MoE router {name} has no layer_number (Megatron sets it "
                                       "when the transformer layer is built)")
                out.append((int(m.layer_number) - 1, m))
    return sorted(out, key=lambda t: t[0])


class RouterControl:
    """Drives the routers of one actor's model for ``mode`` (record | replay); see the module
    docstring.  The actor calls :meth:`step` around every collective forward(-backward) pass and
    :meth:`before_forward` / :meth:`after_forward` around each micro-batch's model call."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], mode: RoutingReplayMode, *,
                 tp_group: Any = None, pp_group: Any = None, sequence_parallel: bool = False):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.mode = mode
        self.routers = moe_routers(model_chunks)
        if not self.routers:
            raise ValueError(f"rollout.routing_replay={mode!r}: the policy has no MoE router "
                             "(a dense model routes nothing); set rollout.routing_replay: off")
        if mode == "replay":
            missing = [i for i, r in self.routers if getattr(r, "router_replay", None) is None]
            if missing:
                raise RuntimeError(f"MoE layers {missing} have no RouterReplay: the model must be "
                                   "built with moe_enable_routing_replay=True")
        self.top_k = int(self.routers[0][1].topk)
        self.tp_group, self.pp_group = tp_group, pp_group
        self.sequence_parallel = sequence_parallel
        self._actions = RouterReplayAction
        self._replay = False
        self._capture = False
        self._captured: dict[int, list[torch.Tensor]] = {}   # layer -> this micro-batch's [N, K]
        self._mb_routes: list[tuple[Any, dict[int, torch.Tensor]]] = []
        self.last: TrainerRoutes | None = None
        self._hooks = [r.register_forward_hook(self._capture_hook(layer))
                       for layer, r in self.routers]

    # ------------------------------------------------------------------ one pass
    @staticmethod
    def samples_carry_routes(samples: Sequence[Sample]) -> bool:
        """True when every sample carries the engine's routes, False when none does; a mix is
        an error (a replayed step must replay every sample)."""
        have = [s.routed_experts is not None for s in samples]
        if any(have) and not all(have):
            raise ValueError(f"{sum(have)} of {len(samples)} samples carry the engine's routed "
                             "experts: routing replay needs them on every sample of the step")
        return bool(have) and all(have)

    @contextlib.contextmanager
    def step(self, samples: Sequence[Sample], *, capture: bool) -> Iterator[bool]:
        """One collective pass over ``samples`` (all micro-batches): replays when the mode is
        replay and the samples carry routes; with ``capture`` (the mismatch forward) records the
        routing used into :attr:`last` (None when the samples carry no routes).  Yields whether
        the micro-batches need packed routes (replay).  The state is fresh at the start and
        cleared at the end, also on error."""
        routed = self.samples_carry_routes(samples)
        self._reset()
        self._replay = routed and self.mode == "replay"
        self._capture = routed and capture
        if capture:
            self.last = None
        try:
            yield self._replay
            if self._capture:
                self.last = self._gather(samples)
        finally:
            self._reset()

    def _reset(self) -> None:
        for _, r in self.routers:
            rr = getattr(r, "router_replay", None)
            if rr is not None:
                rr.clear_indices()
                rr.clear_router_replay_action()
        self._replay = self._capture = False
        self._captured = {}
        self._mb_routes = []

    # ------------------------------------------------------------------ one micro-batch
    def before_forward(self, mb: Any) -> None:
        """Give every local router its target ids for ``mb`` (replay) and open the capture."""
        self._captured = {layer: [] for layer, _ in self.routers}
        if not self._replay:
            return
        if mb.routes is None:
            raise ValueError("routing replay: the micro-batch was packed without the engine's "
                             "routes (pack_samples(..., with_routes=True))")
        lo, hi = self._seq_slice(mb.routes.shape[1])
        for layer, r in self.routers:
            if layer >= mb.routes.shape[2]:
                raise ValueError(f"routing replay: the model has MoE layer {layer} but the engine "
                                 f"reported {mb.routes.shape[2]} layers")
            tgt = mb.routes[:, lo:hi, layer, :].transpose(0, 1).reshape(-1, self.top_k)
            dev = r.weight.device
            r.router_replay.set_target_indices(tgt.to(device=dev, dtype=torch.long))
            r.router_replay.set_router_replay_action(self._actions.REPLAY_FORWARD)

    def after_forward(self, mb: Any, output: Any) -> None:
        """Arm the backward switch to ``REPLAY_BACKWARD`` (recompute pops this micro-batch's
        targets) and keep the captured routing of ``mb``."""
        if self._replay and torch.is_tensor(output) and output.requires_grad:
            output.register_hook(self._to_backward)
        if self._capture:
            self._mb_routes.append((mb, self._collect(mb)))
        self._captured = {}

    def _to_backward(self, grad: torch.Tensor) -> torch.Tensor:
        for _, r in self.routers:
            r.router_replay.set_router_replay_action(self._actions.REPLAY_BACKWARD)
        return grad

    def _capture_hook(self, layer: int):
        def hook(module, args, output):
            if self._capture and layer in self._captured:
                routing_map = output[1]  # [N, E] bool, N = S_local * B in (s, b) order
                ids = routing_map.to(torch.int8).topk(self.top_k, dim=1).indices
                self._captured[layer].append(ids.detach().to("cpu", torch.int32))  # gloo: no int16
        return hook

    # ------------------------------------------------------------------ layouts
    def _tp(self) -> tuple[int, int]:
        import torch.distributed as dist

        if self.tp_group is None or not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)

    def _seq_slice(self, seq_len: int) -> tuple[int, int]:
        """The rows of S this rank's routers see (all of them without sequence parallelism)."""
        tp, rank = self._tp()
        if not self.sequence_parallel or tp == 1:
            return 0, seq_len
        if seq_len % tp:
            raise ValueError(f"sequence parallelism: sequence length {seq_len} is not a multiple "
                             f"of tp={tp}")
        n = seq_len // tp
        return rank * n, (rank + 1) * n

    def _collect(self, mb: Any) -> dict[int, torch.Tensor]:
        """This micro-batch's captured routing per layer as [B, S, K] (the full sequence:
        gathered over TP under sequence parallelism)."""
        import torch.distributed as dist

        b, s = mb.tokens.shape
        tp, _ = self._tp()
        out = {}
        for layer, calls in self._captured.items():
            if len(calls) != 1:
                raise RuntimeError(f"router of layer {layer} ran {len(calls)} times in one "
                                   "micro-batch forward (expected 1)")
            ids = calls[0]
            if self.sequence_parallel and tp > 1:
                parts = [torch.empty_like(ids) for _ in range(tp)]
                dist.all_gather(parts, ids, group=self.tp_group)
                ids = torch.cat(parts)
            out[layer] = ids.view(s, b, self.top_k).transpose(0, 1)
        return out

    def _gather(self, samples: Sequence[Sample]) -> TrainerRoutes:
        """Per-sample response-token routes of every MoE layer (all PP stages' layers, on every
        rank)."""
        import torch.distributed as dist

        local: dict[int, list[np.ndarray]] = {layer: [] for layer, _ in self.routers}
        for mb, per_layer in self._mb_routes:
            for layer, ids in per_layer.items():
                for b in range(ids.shape[0]):
                    local[layer].append(ids[b][mb.loss_mask[b]].numpy())  # [R, K]
        merged = dict(local)
        if self.pp_group is not None and dist.is_initialized() and \
                dist.get_world_size(self.pp_group) > 1:
            parts: list[Any] = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(parts, local, group=self.pp_group)
            merged = {k: v for part in parts for k, v in part.items()}
        layers = sorted(merged)
        for layer in layers:
            if len(merged[layer]) != len(samples):
                raise RuntimeError(f"routing capture: layer {layer} has routes of "
                                   f"{len(merged[layer])} samples, expected {len(samples)}")
        per_sample = [np.stack([merged[layer][i] for layer in layers], axis=1)
                      for i in range(len(samples))]
        return TrainerRoutes(layers=layers, per_sample=per_sample)

    def close(self) -> None:
        self._reset()
        for h in self._hooks:
            h.remove()
        self._hooks = []
