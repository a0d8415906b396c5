"""The one FLOPs counter: model FLOPs per trained token, tokens/s per GPU and MFU.

Convention (the one Megatron-LM and the field's MFU numbers use):

    flops_per_token = 6 * N_active  +  6 * n_layers * seq_len * d_attn / 2 * 2

* ``N_active``: parameters of every matmul a token passes through: attention q/k/v/o projections,
  the MoE router, the ``top_k`` routed experts (+ shared experts), dense MLPs, and the LM head.
  Embedding lookups and norms are not matmuls and are not counted. The factor 6 = 2 (multiply +
  add) x 3 (forward, backward w.r.t. activations, backward w.r.t. weights).
* Attention scores: ``Q K^T`` and ``A V`` cost ``2 * 2 * S * d_attn`` FLOPs per token per layer
  in the forward pass for a full (non-causal) ``S x S`` score matrix (``d_attn = heads *
  head_dim``); x3 for forward + backward. **Causal convention: halved** (only the lower triangle
  is computed by flash-style kernels), i.e. ``6 * S * d_attn`` per token per layer.

Check: Qwen3-30B-A3B at sequence 4096 gives 23.08 GFLOP/token (``tests/training/test_flops.py``).
MFU = achieved model FLOP/s / peak dense BF16 FLOP/s of the device (:data:`PEAK_FLOPS`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) peak FLOP/s per device, by precision.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp8": 1979e12},
    "H200": {"bf16": 989e12, "fp8": 1979e12},
    "H800": {"bf16": 989e12, "fp8": 1979e12},
    "A100": {"bf16": 312e12, "fp8": 312e12},
    "B200": {"bf16": 2250e12, "fp8": 4500e12},
}


@dataclass(frozen=True)
class FlopsModel:
    """What the counter needs from an architecture (HF Qwen3 / Qwen3-MoE field meanings)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int = 0  # dense MLP width (layers without MoE)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: int | None = None  # None: every layer is MoE when num_experts > 0
    gated_mlp: bool = True  # SwiGLU: gate + up + down

    @classmethod
    def from_hf_config(cls, c) -> "FlopsModel":
        get = (lambda k, d=0: c.get(k, d)) if isinstance(c, dict) else (lambda k, d=0: getattr(c, k, d))
        heads = get("num_attention_heads")
        n_exp = get("num_experts", 0) or get("num_local_experts", 0) or 0
        return cls(hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
                   num_heads=heads, num_kv_heads=get("num_key_value_heads", heads) or heads,
                   head_dim=get("head_dim", 0) or get("hidden_size") // heads,
                   vocab_size=get("vocab_size"), intermediate_size=get("intermediate_size", 0) or 0,
                   num_experts=n_exp, top_k=get("num_experts_per_tok", 0) or 0,
                   moe_intermediate_size=get("moe_intermediate_size", 0) or 0,
                   shared_expert_intermediate_size=get("shared_expert_intermediate_size", 0) or 0)

    def active_matmul_params(self) -> int:
        h, d_q = self.hidden_size, self.num_heads * self.head_dim
        d_kv = self.num_kv_heads * self.head_dim
        attn = h * d_q + 2 * h * d_kv + d_q * h
        mats = 3 if self.gated_mlp else 2
        n_moe = self.num_layers if self.moe_layers is None else self.moe_layers
        if self.num_experts == 0:
            n_moe = 0
        moe = (h * self.num_experts + self.top_k * mats * h * self.moe_intermediate_size
               + mats * h * self.shared_expert_intermediate_size)
        dense = mats * h * self.intermediate_size
        per_layers = self.num_layers * attn + n_moe * moe + (self.num_layers - n_moe) * dense
        return per_layers + h * self.vocab_size  # + LM head

    def flops_per_token(self, seq_len: int) -> float:
        """Training (fwd + bwd) model FLOPs per token at sequence length ``seq_len`` (causal)."""
        attn_scores = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim
        return 6.0 * self.active_matmul_params() + attn_scores


def device_peak_flops(precision: str = "bf16") -> tuple[str, float]:
    """(device name, peak FLOP/s). On CPU the "peak" is a measured fp32 GEMM rate (documented:
    CPU MFU is relative to what this machine's BLAS achieves, not a vendor number)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in PEAK_FLOPS.items():
            if key in name:
                return key, peaks.get(precision, peaks["bf16"])
        return name, float("nan")
    return "cpu", _measured_cpu_gemm_flops()


_CPU_PEAK: float | None = None


def _measured_cpu_gemm_flops(n: int = 512, reps: int = 5) -> float:
    global _CPU_PEAK
    if _CPU_PEAK is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = 2 * n ** 3 / best
    return _CPU_PEAK


def throughput_metrics(model: FlopsModel, *, tokens: int, seq_len: int, seconds: float,
                       num_devices: int, peak_flops: float, passes: float = 1.0) -> dict[str, float]:
    """``perf/`` metrics for ``tokens`` trained in ``seconds`` on ``num_devices`` devices.

    ``passes``: how many fwd+bwd passes each token went through in that time (e.g. several
    mini-batch epochs); a forward-only pass counts 1/3.
    """
    per_dev = tokens / max(seconds, 1e-12) / max(num_devices, 1)
    achieved = per_dev * passes * model.flops_per_token(seq_len)
    return {"perf/tokens_per_s_per_gpu": per_dev,
            "perf/model_tflops_per_gpu": achieved / 1e12,
            "perf/mfu": achieved / peak_flops if peak_flops == peak_flops else float("nan")}


class ThroughputMeter:
    """``perf/`` metrics of one step's train phase: tokens/s per device and MFU
    (:func:`throughput_metrics`).  Every sample is trained once (mini-batches are disjoint) after
    one forward for the mismatch log-probs: 1 + 1/3 fwd+bwd passes per token."""

    PASSES_PER_STEP = 4 / 3  # one train pass + the forward-only mismatch pass (1/3)

    def __init__(self, model: FlopsModel, peak_flops: float, num_devices: int):
        self.model = model
        self.peak_flops = peak_flops
        self.num_devices = num_devices

    def measure(self, lengths: list[int], seconds: float) -> dict[str, float]:
        """``lengths``: prompt + response tokens of each sample trained in ``seconds``."""
        out = throughput_metrics(self.model, tokens=sum(lengths),
                                 seq_len=round(sum(lengths) / len(lengths)), seconds=seconds,
                                 num_devices=self.num_devices, peak_flops=self.peak_flops,
                                 passes=self.PASSES_PER_STEP)
        out["perf/train_tokens"] = float(sum(lengths))
        return out
