"""Megatron-Core policy model: distributed init, HF -> Megatron load, optimizer, HF export.

Production code; no platform hacks in here.  On a machine without CUDA the CPU layer
(:func:`drpo_megatron.platform.apply_cpu_compat`, a no-op with CUDA) is applied and the model
provider gets :func:`~drpo_megatron.platform.cpu_transformer_overrides` and the local
(non-Transformer-Engine) layer spec.

Usage (one process, or every rank under torchrun)::

    from drpo_megatron.models import megatron_model as mm

    mm.init_distributed(tp=1, pp=1, ep=1, seed=1234)
    bridge, provider, model = mm.load_policy_from_hf(hf_dir, dtype="fp32", wrap_ddp=True)
    opt = mm.build_optimizer(model, lr=1e-5, weight_decay=0.0, grad_clip=1.0)
    logits = model[0](input_ids, position_ids, mm.causal_attention_mask(S))   # [B, S, V/tp]
    ...  # loss.backward() (or Megatron's get_forward_backward_func), then
    ok, grad_norm, _ = opt.step()
    for name, tensor in mm.export_hf_state_dict(bridge, model):   # collective under TP/PP/EP
        ...
    mm.save_hf_checkpoint(bridge, model, "out/step_10")          # collective; rank 0 writes

GPTModel forward contract (verified on CPU by ``tests/models/test_megatron_model.py``):

* inputs: ``input_ids`` [B, S] int64, ``position_ids`` [B, S] int64, ``attention_mask``
  [1, 1, S, S] (or [B, 1, S, S]) bool with **True = masked** (use
  :func:`causal_attention_mask`; always pass one explicitly).
* with ``labels=None`` the last pipeline stage returns logits [B, S, V/tp] (vocab-parallel
  shard under TP; ``V`` is the padded vocab size of the Megatron model, see
  :func:`vocab_size`); with ``labels`` [B, S] it returns the per-token cross-entropy [B, S].
  Non-last pipeline stages return the hidden states [S, B, H] (sequence-sharded [S/tp, B, H]
  under sequence parallelism) for the next stage.
* the final hidden states (after the final norm) are the output of ``model.decoder``
  [S, B, H] (``[S/tp, B, H]`` with sequence parallelism): see :func:`capture_final_hidden`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, get_args

import torch

from drpo_megatron.models.config import RecomputeMode
from drpo_megatron.models.fp8_config import (apply_precision, check_fp8_supported,
                                             transformer_precision_fields)
from drpo_megatron.platform import apply_cpu_compat, cpu_transformer_overrides
from drpo_megatron.weights.hf_export import write_hf_checkpoint

log = logging.getLogger(__name__)

# megatron-bridge's optional-import helper (``megatron/bridge/utils/import_utils.py``,
# ``safe_import_from``) logs every optional symbol it cannot import -- e.g.
# ``FP8GlobalStateManager`` from Megatron's Transformer Engine extension, absent without TE --
# at INFO *with the full traceback*, through a StreamHandler of its own, during ``import
# megatron.bridge``.  A missing optional symbol is not an error (the bridge raises when one is
# used), so those notices are dropped; its warnings and errors pass.
BRIDGE_IMPORT_LOGGER = "megatron.bridge.utils.import_utils"


class _DropOptionalImportNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_optional_import_notices() -> None:
    """Install the filter on the bridge's import logger (idempotent; before the bridge is
    imported: the notices are logged at import time; the logger object is the same whether
    created here or by the bridge)."""
    lg = logging.getLogger(BRIDGE_IMPORT_LOGGER)
    if not any(isinstance(f, _DropOptionalImportNotices) for f in lg.filters):
        lg.addFilter(_DropOptionalImportNotices())


quiet_optional_import_notices()

__all__ = [
    "init_distributed",
    "destroy_distributed",
    "data_parallel_world_size",
    "load_policy_from_hf",
    "export_hf_state_dict",
    "save_hf_checkpoint",
    "build_optimizer",
    "causal_attention_mask",
    "capture_final_hidden",
    "unwrap_model",
    "vocab_size",
    "recompute_fields",
    "quiet_optional_import_notices",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ensure_platform() -> None:
    if not torch.cuda.is_available():
        apply_cpu_compat()


# ----------------------------------------------------------------------------------- distributed


LOOPBACK = "127.0.0.1"
_IFF_LOOPBACK = 0x8  # linux/if.h: the interface flag of a loopback device
STORE_BACKLOG = 128


def loopback_interface() -> str:
    """The name of the loopback network interface (``lo`` on Linux)."""
    for _, name in socket.if_nameindex():
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & _IFF_LOOPBACK:
            return name
    return "lo"


def loopback_store(timeout: datetime.timedelta, world_size: int = 1):
    """A torch ``TCPStore`` (the master of ``world_size`` ranks) that listens on 127.0.0.1 only,
    and its port.

    torch 2.13's ``TCPStore`` has no bind address: given a host name it still listens on every
    interface.  It does accept a socket that is already listening (``master_listen_fd``): we bind
    that one to loopback ourselves."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(STORE_BACKLOG)
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout=timeout,
                          wait_for_workers=False, master_listen_fd=sock.detach())
    return store, port


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    *,
    etp: Optional[int] = None,
    backend: Optional[str] = None,
    timeout_s: float = 600.0,
    seed: int = 1234,
) -> Dict[str, int]:
    """Initialise torch.distributed, Megatron's model-parallel groups and its RNG tracker.

    * Under torchrun/srun (``WORLD_SIZE`` and ``MASTER_ADDR`` set) it joins with ``env://``;
      otherwise it starts a world of one whose TCPStore listens on 127.0.0.1 only
      (:func:`loopback_store`) and whose gloo sockets use the loopback interface
      (``GLOO_SOCKET_IFNAME``, unless set).
    * ``backend`` defaults to nccl with CUDA, gloo without.
    * Idempotent: a second call with the same sizes returns; different sizes raise.
    * ``etp``: expert tensor-parallel size (None: Megatron's default, equal to ``tp``).
    * ``seed``: Megatron's RNG tracker seed (``model_parallel_cuda_manual_seed``).

    Returns ``{"rank", "world_size", "tp", "pp", "ep", "dp"}``.
    """
    _ensure_platform()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if cuda else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # the store at MASTER_ADDR:MASTER_PORT is torchrun's (its agent's TCPStore, or rank
            # 0's): it listens on every interface, whatever MASTER_ADDR says (torch 2.13 has no
            # bind setting for it; docs/operate.md, Security)
            log.info(
                "init_distributed: rank %d waiting for %d ranks at %s:%s (backend %s, timeout "
                "%.0fs; torchrun's TCPStore listens on all interfaces)",
                rank, world, os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT"), backend,
                timeout_s)
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        else:
            # everything on this host: the store and gloo's sockets on loopback only
            store, port = loopback_store(timeout)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
            log.info("init_distributed: single process, %s; TCPStore listening on %s:%d only, "
                     "gloo on interface %s", backend, LOOPBACK, port,
                     os.environ["GLOO_SOCKET_IFNAME"])
            if cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                                    timeout=timeout)
        log.info("init_distributed: %d ranks joined", dist.get_world_size())

    world = dist.get_world_size()
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size())
        if have != (tp, pp, ep):
            raise RuntimeError(f"model parallel already initialised with (tp, pp, ep)={have}, "
                               f"asked for {(tp, pp, ep)}; call destroy_distributed() first")
    else:
        if world % (tp * pp) != 0:
            raise ValueError(f"world size {world} is not divisible by tp*pp={tp * pp}")
        log.info("init_distributed: model parallel tp=%d pp=%d ep=%d over %d ranks", tp, pp, ep, world)
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
        model_parallel_cuda_manual_seed(seed)
    return {
        "rank": dist.get_rank(),
        "world_size": world,
        "tp": tp,
        "pp": pp,
        "ep": ep,
        "dp": ps.get_data_parallel_world_size(),
    }


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group (idempotent)."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel_world_size() -> int:
    """Megatron's data-parallel world size (1 before initialisation)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1


# ------------------------------------------------------------------------------- model loading

RECOMPUTE_MODES = get_args(RecomputeMode)  # parallel.recompute (models/config.py)


def recompute_fields(mode: str) -> Dict[str, Any]:
    """Megatron-Core 0.19.2 ``TransformerConfig`` fields for ``parallel.recompute``.

    * ``none``: nothing recomputed (``recompute_granularity=None``): every activation is kept.
    * ``selective``: ``recompute_granularity="selective"``, ``recompute_modules=["core_attn"]``
      (Megatron's default module set): the core attention (softmax(QK^T) V and its S x S score
      and probability tensors) is recomputed in backward from Q, K, V.  With fused / flash
      attention (Transformer Engine on GPU) that part keeps no S x S tensors anyway.
    * ``full``: ``recompute_granularity="full"``, ``recompute_method="uniform"``,
      ``recompute_num_layers=1``: every transformer layer is recomputed in backward; only each
      layer's input [S, B, H] is kept (what ``drpo plan``'s estimate assumes).

    Losses and gradients are the same in all three modes (``tests/models/test_recompute.py``).
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"parallel.recompute={mode!r}: choose one of {list(RECOMPUTE_MODES)}")
    if mode == "none":
        return {"recompute_granularity": None, "recompute_method": None,
                "recompute_num_layers": None}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_method": None,
                "recompute_num_layers": None, "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": 1}



def _apply_fields(obj: Any, fields: Dict[str, Any], strict: bool) -> None:
    for key, value in fields.items():
        if not hasattr(obj, key):
            if strict:
                raise AttributeError(f"{type(obj).__name__} has no field {key!r}")
            continue
        setattr(obj, key, value)


def load_policy_from_hf(
    hf_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    seq_parallel: Optional[bool] = None,
    overrides: Optional[Dict[str, Any]] = None,
    wrap_ddp: bool = False,
    use_distributed_optimizer: bool = False,
    load_weights: bool = True,
    seed: int = 1234,
    fp8: Any = None,
    recompute: str = "none",
) -> Tuple[Any, Any, List[torch.nn.Module]]:
    """Build the Megatron-Core model of an HF checkpoint via megatron-bridge.

    Returns ``(bridge, provider, model_chunks)``: the ``AutoBridge`` (HF <-> Megatron names),
    the ``GPTModelProvider`` (a ``TransformerConfig``) and the list of model chunks (one
    without virtual pipelining), wrapped in Megatron ``DistributedDataParallel`` when
    ``wrap_ddp`` (``use_distributed_optimizer`` must then match :func:`build_optimizer`'s).
    With DDP, the model config's ``finalize_model_grads_func`` / ``no_sync_func`` are set, so
    ``get_forward_backward_func()`` syncs gradients; a hand-written loop must call
    ``megatron.core.distributed.finalize_model_grads(model_chunks)`` before ``optimizer.step()``.

    ``dtype``: "fp32" or "bf16" (params and compute; with bf16 the DDP grad buffers and the
    optimizer's main params stay fp32).  ``seq_parallel`` defaults to ``tp > 1`` (Megatron
    requires it for MoE with TP).  ``overrides``: provider fields set last (e.g.
    ``{"moe_token_dispatcher_type": "allgather"}``).  Initialises distributed state
    (:func:`init_distributed`) if needed.  ``fp8``: a
    :class:`~drpo_megatron.models.fp8_config.PrecisionConfig` with FP8 on (GPU + Transformer
    Engine; translated by ``fp8_config.apply_precision``, TE layer spec); None or FP8 off = the
    ``dtype`` path.  ``recompute``: activation recomputation, none | selective | full
    (:func:`recompute_fields`; ``overrides`` may set the same fields and win).
    """
    _ensure_platform()
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    recompute_cfg = recompute_fields(recompute)  # the clear error before anything is built
    if fp8 is not None and fp8.fp8:
        transformer_precision_fields(fp8)  # config errors first
        check_fp8_supported()              # then the clear "needs CUDA / TE" error
    init_distributed(tp=tp, pp=pp, ep=ep, etp=etp, seed=seed)
    from megatron.bridge import AutoBridge
    from megatron.core.distributed import DistributedDataParallelConfig

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=load_weights)
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.expert_model_parallel_size = ep
    if etp is not None:
        provider.expert_tensor_parallel_size = etp
    provider.sequence_parallel = (tp > 1) if seq_parallel is None else seq_parallel
    torch_dtype = _DTYPES[dtype]
    provider.params_dtype = torch_dtype
    provider.pipeline_dtype = torch_dtype
    provider.bf16 = dtype == "bf16"
    provider.fp16 = False
    cpu = not torch.cuda.is_available()
    if cpu:
        from megatron.bridge.models.gpt_provider import local_layer_spec

        _apply_fields(provider, cpu_transformer_overrides(), strict=False)
        provider.transformer_layer_spec = local_layer_spec
    if fp8 is not None and fp8.fp8:
        apply_precision(provider, fp8)
    _apply_fields(provider, recompute_cfg, strict=True)
    if overrides:
        _apply_fields(provider, overrides, strict=True)
    provider.finalize()

    ddp_config = None
    if wrap_ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            use_distributed_optimizer=use_distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=None,
        )
    model = provider.provide_distributed_model(
        ddp_config=ddp_config,
        wrap_with_ddp=wrap_ddp,
        bf16=dtype == "bf16",
        fp16=False,
        use_cpu_initialization=bool(getattr(provider, "use_cpu_initialization", False)) or cpu,
    )
    if wrap_ddp:
        # What Megatron's own training loop wires up: the schedules call this after the last
        # backward (DP all-reduce / reduce-scatter, SP norm and q/k-norm grad all-reduce over TP,
        # embedding-grad sync over PP) and use no_sync between micro-batches.
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        mcfg = get_model_config(model[0])
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    log.info("load_policy_from_hf: %s -> %d chunk(s), dtype %s, tp=%d pp=%d ep=%d sp=%s ddp=%s "
             "recompute=%s", hf_dir, len(model), dtype, tp, pp, ep, provider.sequence_parallel,
             wrap_ddp, provider.recompute_granularity or "none")
    return bridge, provider, model


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def vocab_size(model_chunks: Sequence[torch.nn.Module]) -> int:
    """The (padded) vocabulary size of the Megatron model (full, not the TP shard)."""
    return unwrap_model(model_chunks[0]).vocab_size


def causal_attention_mask(seq_len: int, device: Any = None) -> torch.Tensor:
    """[1, 1, S, S] bool mask, True above the diagonal (= masked), as Megatron expects."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1).view(
        1, 1, seq_len, seq_len)


@contextlib.contextmanager
def capture_final_hidden(model_chunk: torch.nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Capture the final hidden states (after the final norm) of a forward pass.

    ``with capture_final_hidden(model[0]) as out: logits = model[0](ids, pos, mask)`` then
    ``out["hidden"]`` is [S, B, H] ([S/tp, B, H] with sequence parallelism) on the last
    pipeline stage.  The tensor is part of the autograd graph.
    """
    captured: Dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = unwrap_model(model_chunk).decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------ export


def export_hf_state_dict(
    bridge: Any, model_chunks: Sequence[torch.nn.Module], *, cpu: bool = True
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every HF weight, gathered over TP/PP/EP by the bridge.

    Collective under model parallelism: every rank must iterate to the end (all ranks get
    every tensor).  Tensors are full (unsharded), in the model's dtype, on CPU when ``cpu``.
    """
    for name, tensor in bridge.export_hf_weights(list(model_chunks), cpu=cpu, show_progress=False):
        yield name, tensor


def save_hf_checkpoint(
    bridge: Any,
    model_chunks: Sequence[torch.nn.Module],
    out_dir: str | os.PathLike,
    *,
    copy_from: str | os.PathLike,
    precision: str = "bf16",
) -> Path:
    """Write an HF checkpoint (config + safetensors) atomically; returns ``out_dir``.

    Collective: all ranks iterate the gathered tensors (:func:`export_hf_state_dict`), rank 0
    writes through :func:`drpo_megatron.weights.hf_export.write_hf_checkpoint` (temporary
    folder, then rename).  ``copy_from``: the source HF directory whose config.json and tokenizer
    files are copied.  ``precision``: bf16 (as is) | fp8_emulated | fp8 (rollout layouts).
    """
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    path = write_hf_checkpoint(export_hf_state_dict(bridge, model_chunks), out_dir,
                               source_dir=copy_from, precision=precision, write=rank0)
    if dist.is_initialized():
        dist.barrier()
    return path


# --------------------------------------------------------------------------------- optimizer


def build_optimizer(
    model_chunks: Sequence[torch.nn.Module],
    lr: float,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    adam_betas: Tuple[float, float] = (0.9, 0.999),
    use_distributed_optimizer: bool = False,
    *,
    adam_eps: float = 1e-8,
    optimizer: str = "adam",
):
    """Megatron optimizer (Adam with decoupled weight decay, or ``optimizer="sgd"``) with
    gradient-norm clipping, for DDP-wrapped model chunks.

    ``optimizer.step()`` returns ``(update_successful, grad_norm, num_zeros)``; the learning
    rate is constant (``lr``) unless the caller changes ``param_groups``.
    ``use_distributed_optimizer`` must match the DDP config used in :func:`load_policy_from_hf`.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    chunks = list(model_chunks)
    ddp_cfg = getattr(chunks[0], "ddp_config", None)
    if ddp_cfg is None:
        raise ValueError("build_optimizer needs DDP-wrapped model chunks (load_policy_from_hf(..., "
                         "wrap_ddp=True))")
    if ddp_cfg.use_distributed_optimizer != use_distributed_optimizer:
        raise ValueError(f"use_distributed_optimizer={use_distributed_optimizer} but the model's "
                         f"DDP config has {ddp_cfg.use_distributed_optimizer}")
    mcfg = get_model_config(chunks[0])
    cfg = OptimizerConfig(
        optimizer=optimizer,
        sgd_momentum=0.0,
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1],
        adam_eps=adam_eps,
        clip_grad=grad_clip,
        bf16=bool(mcfg.bf16),
        fp16=False,
        params_dtype=mcfg.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    megatron_optimizer = get_megatron_optimizer(cfg, chunks)
    for group in megatron_optimizer.param_groups:
        group["lr"] = lr
    return megatron_optimizer


