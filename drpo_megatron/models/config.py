"""Config sections of the policy model and its parallel layout (``model:``, ``parallel:``).

The layout is checked by :func:`drpo_megatron.models.layout.check_layout`, the one layout check
that config validation, ``drpo plan`` and ``drpo convert`` all call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drpo_megatron.models.layout import LayoutError, check_layout
from drpo_megatron.models.tiny import TinyModelConfig
from drpo_megatron.schema import ConfigError, Section

#: Training precision of the Megatron policy (FP8 is set separately, GPU only).
TrainDtype = Literal["fp32", "bf16"]
#: FP8 training through Transformer Engine: "" (off) or "blockwise" (128x128 blocks, FP32 scales).
Fp8Training = Literal["", "blockwise"]
#: Activation recomputation (Megatron-Core ``recompute_granularity``): none | selective | full.
RecomputeMode = Literal["none", "selective", "full"]


class ArchConfig(Section):
    """HF config.json field meanings (Qwen2 / Qwen3 / Qwen3-MoE / Qwen3.5-MoE), for ``drpo plan``."""

    architecture: str = ""
    """HF architecture name, e.g. Qwen3MoeForCausalLM."""
    hidden_size: int = Field(default=0, ge=0)
    """Hidden size."""
    num_hidden_layers: int = Field(default=0, ge=0)
    """Transformer layers."""
    num_attention_heads: int = Field(default=0, ge=0)
    """Query heads."""
    num_key_value_heads: int = Field(default=0, ge=0)
    """Key/value heads."""
    head_dim: int = Field(default=0, ge=0)
    """Per-head dimension (0: hidden_size / num_attention_heads)."""
    vocab_size: int = Field(default=0, ge=0)
    """Vocabulary size."""
    intermediate_size: int = Field(default=0, ge=0)
    """Dense FFN size."""
    num_experts: int = Field(default=0, ge=0)
    """Routed experts per MoE layer (0: dense)."""
    num_experts_per_tok: int = Field(default=0, ge=0)
    """Experts per token (top-k)."""
    moe_intermediate_size: int = Field(default=0, ge=0)
    """FFN size of one expert."""
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    """FFN size of the shared expert (0: none)."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    full_attention_interval: int = Field(default=1, ge=1)
    """Qwen3.5 hybrid: every full_attention_interval-th layer is full attention, the others Gated
    DeltaNet (planned with the linear_* head numbers). 1 = every layer full attention."""
    linear_num_key_heads: int = Field(default=0, ge=0)
    """Gated DeltaNet key heads."""
    linear_num_value_heads: int = Field(default=0, ge=0)
    """Gated DeltaNet value heads."""
    linear_key_head_dim: int = Field(default=0, ge=0)
    """Gated DeltaNet key head dimension."""
    linear_value_head_dim: int = Field(default=0, ge=0)
    """Gated DeltaNet value head dimension."""


class ModelConfig(Section):
    """The initial policy."""

    hf_path: str = ""
    """HF checkpoint directory of the initial policy; empty = build the embedded tiny Qwen3-MoE."""
    cache_dir: str = "~/.cache/drpo-megatron"
    """Where the embedded tiny checkpoint is built / reused."""
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Architecture and warm start of the embedded tiny policy (hf_path empty)."""
    dtype: TrainDtype = "fp32"
    """Training precision of the Megatron policy: fp32 or bf16 (FP8 is model.fp8, GPU only)."""
    fp8: Fp8Training = ""
    """FP8 training through Transformer Engine (GPU only): "" (off) or "blockwise" (128x128
    blocks, FP32 scales: NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1, fp8 params off; router,
    embeddings, LM head and norms stay in model.dtype, which must then be bf16)."""
    moe_aux_loss_coeff: float | None = Field(default=None, ge=0)
    """MoE load-balancing (aux) loss coefficient added to the policy loss; null = the
    checkpoint's router_aux_loss_coef. Megatron computes it per micro-batch on each data-parallel
    rank's tokens, so with it on the gradient depends (slightly) on the DP layout."""
    arch: ArchConfig = Field(default_factory=ArchConfig)
    """Architecture numbers for `drpo plan` (HF config.json names). Zeros: read from
    hf_path/config.json when that directory exists."""


class ParallelConfig(Section):
    """Cluster layout of one run.  The trainer world is ``num_nodes * gpus_per_node`` ranks
    (``dp = world / (tp * pp)``, derived); rollout servers run on ``rollout_nodes`` extra nodes
    (0 = colocated on the trainer nodes)."""

    device: Literal["auto", "cuda"] = "auto"
    """"auto": this machine; "cuda": the config targets GPU nodes, so device-dependent checks
    (CUDA present, hf_path exists, FP8) are deferred to run time on those nodes."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel size."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel size."""
    ep: int = Field(default=1, ge=1)
    """Expert-parallel size."""
    etp: int | None = Field(default=None, ge=1)
    """Expert tensor-parallel size; null = Megatron's default (tp)."""
    sequence_parallel: bool | None = None
    """Sequence parallelism; null = on when tp > 1 (required for MoE + TP)."""
    num_nodes: int = Field(default=1, ge=1)
    """Trainer nodes."""
    gpus_per_node: int = Field(default=1, ge=1)
    """Training processes per node (GPUs; CPU processes on a CPU machine)."""
    rollout_nodes: int = Field(default=0, ge=0)
    """Extra nodes for rollout servers; 0 = servers colocated on the trainer nodes."""
    rollout_tp: int = Field(default=1, ge=1)
    """SGLang tensor-parallel size of one server."""
    micro_batch_size: int = Field(default=64, ge=1)
    """Sequences per training micro-batch (per DP rank). 64 = the embedded CPU run's whole
    per-update mini-batch in one micro-batch (CPU matmuls want rows); GPU configs use 1-4."""
    recompute: RecomputeMode = "none"
    """Activation recomputation: none | selective | full."""
    use_distributed_optimizer: bool = True
    """Megatron's distributed optimizer (optimizer state sharded over data-parallel ranks)."""
    gpu_memory_gb: float = Field(default=80.0, gt=0)
    """Per-GPU memory `drpo plan` fits into (e.g. 80 for H100)."""

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def check(self, world: int | None = None) -> None:
        """The one layout check (:func:`drpo_megatron.models.layout.check_layout`) of this layout
        on ``world`` ranks (default: its own), plus the settings only a config has."""
        try:
            check_layout(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp,
                         world=world or self.world_size)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; set it to "
                              "null or false")
