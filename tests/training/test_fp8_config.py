"""FP8 / bf16 precision -> Megatron TransformerConfig fields (one translation function)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from drpo_megatron.models.fp8_config import (PrecisionConfig, check_fp8_supported,
                                             transformer_precision_fields)

HAVE_TE = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def test_bf16_is_fp8_off():
    fields, env = transformer_precision_fields(PrecisionConfig(dtype="bf16"))
    assert fields["bf16"] is True and fields["fp8"] is None and fields["fp8_param"] is False
    assert fields["params_dtype"] == torch.bfloat16 and env == {}
    fields, _ = transformer_precision_fields(PrecisionConfig(dtype="fp32"))
    assert fields["bf16"] is False and fields["params_dtype"] == torch.float32


def test_paper_blockwise_recipe():
    fields, env = transformer_precision_fields(PrecisionConfig.from_setting("bf16", "blockwise"))
    assert fields["fp8"] == "e4m3" and fields["fp8_recipe"] == "blockwise"
    assert fields["fp8_param"] is False and fields["first_last_layers_bf16"] is False
    assert env == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}


@pytest.mark.parametrize("setting,fmt,recipe", [("hybrid-tensorwise", "hybrid", "tensorwise"),
                                                ("e4m3-delayed", "e4m3", "delayed"),
                                                ("hybrid", "hybrid", "blockwise")])
def test_formats_and_recipes(setting, fmt, recipe):
    p = PrecisionConfig.from_setting("bf16", setting)
    fields, env = transformer_precision_fields(p)
    assert (fields["fp8"], fields["fp8_recipe"]) == (fmt, recipe)
    if recipe == "delayed":
        assert fields["fp8_amax_history_len"] == 1024 and fields["fp8_amax_compute_algo"] == "max"
        assert env == {}


def test_bf16_first_last_layers_and_fp8_param():
    p = PrecisionConfig(fp8="e4m3", fp8_recipe="tensorwise", fp8_param=True, bf16_first_layers=1,
                        bf16_last_layers=2)
    fields, _ = transformer_precision_fields(p, num_layers=48)
    assert fields["fp8_param"] is True and fields["first_last_layers_bf16"] is True
    assert fields["num_layers_at_start_in_bf16"] == 1 and fields["num_layers_at_end_in_bf16"] == 2


def test_translated_fields_exist_on_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    p = PrecisionConfig(fp8="hybrid", fp8_recipe="delayed", fp8_param=True)
    fields, _ = transformer_precision_fields(p)
    names = set(TransformerConfig.__dataclass_fields__)
    assert set(fields) <= names, set(fields) - names


@pytest.mark.parametrize("kwargs,match", [
    (dict(fp8="e5m2"), "fp8="),
    (dict(fp8="e4m3", fp8_recipe="mxfp4"), "fp8_recipe"),
    (dict(dtype="fp32", fp8="e4m3"), "bf16"),
    (dict(fp8="e4m3", fp8_recipe="delayed", bf16_first_layers=1), "delayed"),
    (dict(fp8_param=True), "need fp8"),
])
def test_invalid_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transformer_precision_fields(PrecisionConfig(**kwargs))
    with pytest.raises(ValueError, match="unknown part"):
        PrecisionConfig.from_setting("bf16", "blockwise-e4m3x")


def test_too_many_bf16_layers():
    with pytest.raises(ValueError, match="no FP8 layer"):
        transformer_precision_fields(PrecisionConfig(fp8="e4m3", bf16_first_layers=1,
                                                     bf16_last_layers=1), num_layers=2)


@pytest.mark.skipif(HAVE_TE, reason="checks the error without Transformer Engine")
def test_fp8_without_te_fails_clearly():
    with pytest.raises(RuntimeError, match="Transformer Engine") as e:
        check_fp8_supported()
    assert "model.fp8" in str(e.value)
    from drpo_megatron.models import megatron_model as mm

    # fails before any process group / model is built
    with pytest.raises(RuntimeError, match="FP8 training needs"):
        mm.load_policy_from_hf("/nonexistent", dtype="bf16",
                               fp8=PrecisionConfig.from_setting("bf16", "blockwise"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TE, reason="needs CUDA and Transformer Engine")
def test_fp8_blockwise_builds_and_steps(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from drpo_megatron.models import megatron_model as mm

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                         moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    _, provider, model = mm.load_policy_from_hf(
        tmp_path / "hf", dtype="bf16", wrap_ddp=True,
        fp8=PrecisionConfig.from_setting("bf16", "blockwise"))
    assert provider.fp8 == "e4m3" and provider.fp8_recipe == "blockwise"
    opt = mm.build_optimizer(model, lr=1e-4)
    ids = torch.randint(0, 256, (2, 129), device="cuda")
    pos = torch.arange(128, device="cuda").expand(2, 128)
    from megatron.core.distributed import finalize_model_grads

    # the TransformerBlock enters the FP8 (autocast) context per layer itself
    loss = model[0](ids[:, :-1], pos, mm.causal_attention_mask(128, "cuda"),
                    labels=ids[:, 1:]).mean()
    loss.backward()
    finalize_model_grads(model)
    ok, grad_norm, _ = opt.step()
    assert ok and torch.isfinite(torch.tensor(grad_norm))
