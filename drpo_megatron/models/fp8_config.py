"""Training precision (bf16 / FP8 through Transformer Engine) -> Megatron TransformerConfig fields.

One function, :func:`transformer_precision_fields`, turns a :class:`PrecisionConfig` into the
Megatron-Core ``TransformerConfig`` fields (``bf16``, ``fp8``, ``fp8_recipe``, ``fp8_param``,
``first_last_layers_bf16``, ``num_layers_at_{start,end}_in_bf16``, amax settings for the delayed
recipe) plus the environment the recipe needs (``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` for the
paper's blockwise recipe).  :func:`check_fp8_supported` fails early, with a message that says what
is missing, when FP8 is asked for on a machine without CUDA or Transformer Engine (the local,
non-TE layer spec has no FP8 kernels; Megatron would otherwise fail deep inside model build).

The paper's FP8 end-to-end setting: e4m3, blockwise 128x128 with FP32 scales, fp8 params off;
router, embeddings, LM head and norms stay bf16 (TE only quantizes the linear layers' GEMMs, so
this holds by construction).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

__all__ = ["PrecisionConfig", "transformer_precision_fields", "check_fp8_supported",
           "apply_precision", "FP8_FORMATS", "FP8_RECIPES"]

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("blockwise", "tensorwise", "delayed")


@dataclass
class PrecisionConfig:
    """``dtype``: "bf16" | "fp32" (params / non-FP8 compute); ``fp8``: "" (off) | "e4m3" |
    "hybrid" (e4m3 forward, e5m2 gradients); ``fp8_recipe``: "blockwise" (128x128 blocks, FP32
    scales: the paper's recipe) | "tensorwise" (current scaling) | "delayed" (amax history);
    ``fp8_param``: keep the weights themselves in FP8 (off: bf16 master weights, FP8 GEMMs);
    ``bf16_first_layers`` / ``bf16_last_layers``: transformer layers at the start / end kept in
    bf16 (0 = none; not supported with the delayed recipe)."""

    dtype: str = "bf16"
    fp8: str = ""
    fp8_recipe: str = "blockwise"
    fp8_param: bool = False
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    fp8_amax_history_len: int = 1024   # delayed recipe only
    fp8_amax_compute_algo: str = "max"  # delayed recipe only

    @classmethod
    def from_setting(cls, dtype: str, fp8: str) -> "PrecisionConfig":
        """From the run config's ``model.dtype`` and ``model.fp8`` ("" | "blockwise" |
        "tensorwise" | "delayed" | "e4m3" | "hybrid", optionally "<format>-<recipe>")."""
        if not fp8:
            return cls(dtype=dtype)
        fmt, recipe = "e4m3", "blockwise"
        for part in fp8.split("-"):
            if part in FP8_FORMATS:
                fmt = part
            elif part in FP8_RECIPES:
                recipe = part
            else:
                raise ValueError(f"model.fp8={fp8!r}: unknown part {part!r}; use a format "
                                 f"{FP8_FORMATS} and/or a recipe {FP8_RECIPES}")
        return cls(dtype=dtype, fp8=fmt, fp8_recipe=recipe)


def transformer_precision_fields(p: PrecisionConfig, num_layers: int | None = None
                                 ) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(TransformerConfig fields, environment variables)`` for precision ``p``.

    Validates the combination (clear ``ValueError`` messages); ``num_layers`` (optional) bounds
    the bf16 first/last layer counts."""
    if p.dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype={p.dtype!r}: choose 'bf16' or 'fp32'")
    fields: Dict[str, Any] = {"bf16": p.dtype == "bf16", "fp16": False,
                              "params_dtype": torch.bfloat16 if p.dtype == "bf16" else torch.float32,
                              "fp8": None, "fp8_param": False, "first_last_layers_bf16": False}
    env: Dict[str, str] = {}
    if not p.fp8:
        if p.fp8_param or p.bf16_first_layers or p.bf16_last_layers:
            raise ValueError("fp8_param / bf16 first-last layers need fp8 on")
        return fields, env
    if p.fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8={p.fp8!r}: choose one of {FP8_FORMATS} (or '' for off)")
    if p.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe={p.fp8_recipe!r}: choose one of {FP8_RECIPES}")
    if p.dtype != "bf16":
        raise ValueError("FP8 training needs dtype='bf16' (the non-FP8 parts: router, embeddings, "
                         "LM head, norms, run in bf16)")
    if p.bf16_first_layers < 0 or p.bf16_last_layers < 0:
        raise ValueError("bf16_first_layers / bf16_last_layers must be >= 0")
    mixed = bool(p.bf16_first_layers or p.bf16_last_layers)
    if mixed and p.fp8_recipe == "delayed":
        raise ValueError("bf16 first/last layers are not supported with the delayed recipe "
                         "(Megatron); use blockwise or tensorwise")
    if mixed and num_layers is not None and p.bf16_first_layers + p.bf16_last_layers >= num_layers:
        raise ValueError(f"bf16_first_layers + bf16_last_layers = "
                         f"{p.bf16_first_layers + p.bf16_last_layers} leaves no FP8 layer of "
                         f"{num_layers}")
    fields.update(fp8=p.fp8, fp8_recipe=p.fp8_recipe, fp8_param=bool(p.fp8_param),
                  first_last_layers_bf16=mixed)
    if mixed:
        fields.update(num_layers_at_start_in_bf16=p.bf16_first_layers,
                      num_layers_at_end_in_bf16=p.bf16_last_layers)
    if p.fp8_recipe == "delayed":
        fields.update(fp8_amax_history_len=p.fp8_amax_history_len,
                      fp8_amax_compute_algo=p.fp8_amax_compute_algo)
    if p.fp8_recipe == "blockwise":
        env["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] = "1"
    return fields, env


def check_fp8_supported() -> None:
    """Raise ``RuntimeError`` naming what is missing for FP8 training (CUDA, Transformer
    Engine); returns when both are present."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("transformer_engine") is None:
        missing.append("Transformer Engine (pip install transformer-engine[pytorch]; the local "
                       "Megatron layer spec has no FP8 GEMMs)")
    if missing:
        raise RuntimeError("FP8 training needs " + " and ".join(missing) +
                           "; set model.fp8 to '' for bf16 training")


def apply_precision(provider: Any, p: PrecisionConfig) -> Dict[str, str]:
    """Set the precision fields on a Megatron provider / TransformerConfig (and, for FP8, the
    Transformer Engine layer spec); returns the env vars the caller must export before the
    first FP8 GEMM (they are also set in ``os.environ`` here)."""
    import os

    if p.fp8:
        check_fp8_supported()
    fields, env = transformer_precision_fields(p, getattr(provider, "num_layers", None))
    for k, v in fields.items():
        setattr(provider, k, v)
    if p.fp8:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)

        provider.transformer_layer_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=getattr(provider, "num_moe_experts", None),
            moe_grouped_gemm=bool(getattr(provider, "moe_grouped_gemm", False)),
            qk_layernorm=bool(getattr(provider, "qk_layernorm", False)))
    os.environ.update(env)
    return env
