"""The FLOPs counter against hand-derived numbers."""

import pytest

from drpo_megatron.training.flops import FlopsModel, throughput_metrics

QWEN3_30B_A3B = {  # config.json of Qwen/Qwen3-30B-A3B
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "intermediate_size": 6144,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
}


def test_qwen3_30b_a3b_about_23_gflop_per_token_at_4096():
    m = FlopsModel.from_hf_config(QWEN3_30B_A3B)
    # by hand: attention 18,874,368 + router 262,144 + 8 experts x 3 x 2048 x 768 = 37,748,736
    # per layer; x48 + LM head 311,164,928 = 3,041,165,312 active matmul params
    assert m.active_matmul_params() == 48 * (18_874_368 + 262_144 + 37_748_736) + 311_164_928
    # causal attention: 6 * 48 * 4096 * 4096 = 4.83 GFLOP
    gflop = m.flops_per_token(4096) / 1e9
    assert gflop == pytest.approx(23.0, rel=0.01)


def test_dense_model_and_metrics():
    m = FlopsModel(hidden_size=4, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2,
                   vocab_size=10, intermediate_size=8)
    # attn 4*4 + 2*4*2 + 4*4 = 48; mlp 3*4*8 = 96; head 40 -> 184
    assert m.active_matmul_params() == 184
    assert m.flops_per_token(3) == 6 * 184 + 6 * 1 * 3 * 4
    out = throughput_metrics(m, tokens=1000, seq_len=3, seconds=2.0, num_devices=2,
                             peak_flops=1e6)
    assert out["perf/tokens_per_s_per_gpu"] == 250.0
    assert out["perf/mfu"] == pytest.approx(250.0 * m.flops_per_token(3) / 1e6)
