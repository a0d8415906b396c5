"""``drpo plan``: per-GPU memory estimate against hand-computed numbers, and the shipped
paper configs fit their layouts."""

import glob

import pytest

from drpo_megatron.config import load_config
from drpo_megatron.operate.plan import GIB, OVERHEAD_GIB, check_fits, main, make_plan

DENSE_ARCH = dict(architecture="Qwen3ForCausalLM", hidden_size=8, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=16,
                  intermediate_size=16)
MOE_ARCH = dict(architecture="Qwen3MoeForCausalLM", hidden_size=8, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=2, vocab_size=10,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4)


def _cfg(arch, parallel, **model):
    # the hand-computed numbers below are for one sequence per micro-batch (a GPU layout)
    return load_config(None, {"model": {"dtype": "bf16", "arch": arch, **model},
                              "parallel": {"micro_batch_size": 1, **parallel}})


def _b(gib):  # GiB -> bytes
    return round(gib * GIB, 3)


def test_dense_by_hand():
    p = make_plan(_cfg(DENSE_ARCH, {"recompute": "none"}))
    # attention 8*8 + 2*8*8 + 8*8 + 2 norms*8 = 272; MLP 3*8*16 = 384; x2 layers = 1312;
    # embedding 16*8 + LM head 16*8 = 256 -> 1568
    assert p.params_total == 1568 and p.params_dense_per_gpu == 1568 and p.params_expert_per_gpu == 0
    assert _b(p.weights_gib) == 1568 * 2           # bf16
    assert _b(p.grads_gib) == 1568 * 4             # fp32 grad buffer
    assert _b(p.optimizer_gib) == 1568 * 12        # fp32 main + m + v, dp = 1
    # per token per layer: 2 B * (2h + 2 d_q + 2 d_kv + h + 3 f) = 2 * (16+16+16+8+48) = 208 B;
    # tokens = 1 micro-batch x 16 (max_new_tokens) -> 16 * 2 layers * 208
    assert _b(p.activations_gib) == 16 * 2 * 208
    assert _b(p.logprob_gib) == 3 * 1024 * 16 * 4 + 2 * 16 * 8 * 4
    assert p.micro_batches_per_update == 64        # 16 prompts x 8 samples / 2 updates
    assert p.total_gib == pytest.approx(
        (3136 + 6272 + 18816 + 6656 + 197632) / GIB + OVERHEAD_GIB)


def test_moe_tp2_pp2_ep2_by_hand():
    p = make_plan(_cfg(MOE_ARCH, {"tp": 2, "pp": 2, "ep": 2, "etp": 1, "gpus_per_node": 8,
                                  "recompute": "full"}))
    assert (p.world_size, p.dp, p.expert_dp) == (8, 2, 2)
    # attention 8*8 + 2*8*4 + 8*8 + 16 = 208, router 8*4 = 32 -> dense 4 * 240 = 960;
    # experts 4 * 3*8*4 = 384 per layer -> 1536; embedding 80 + head 80
    assert p.params_total == 960 + 1536 + 160
    assert p.params_dense_per_gpu == 960 / 2 / 2 + 80 / 2   # pp=2: the larger of embed/head
    assert p.params_expert_per_gpu == 1536 / 2 / 2           # / pp / (ep * etp)
    assert _b(p.weights_gib) == (280 + 384) * 2
    assert _b(p.grads_gib) == (280 + 384) * 4
    assert _b(p.optimizer_gib) == 280 * 12 / 2 + 384 * 12 / 2  # distributed optimizer: / dp, / edp
    # full recompute: 2 B * h per token per layer; 16 tokens x min(pp, 32 micro-batches) = 32
    # tokens in flight; 2 layers per stage; / tp
    assert p.micro_batches_per_update == 32
    assert _b(p.activations_gib) == 32 * 2 * 16 / 2
    assert _b(p.logprob_gib) == 3 * 1024 * 5 * 4 + 2 * 5 * 8 * 4


def test_fp8_and_fp32_state_bytes():
    p8 = make_plan(_cfg(DENSE_ARCH, {"device": "cuda"}, fp8="blockwise"))
    assert _b(p8.weights_gib) == 1568 * 3
    p32 = make_plan(load_config(None, {"model": {"dtype": "fp32", "arch": DENSE_ARCH},
                                       "parallel": {"use_distributed_optimizer": False}}))
    assert _b(p32.weights_gib) == 1568 * 4 and _b(p32.optimizer_gib) == 1568 * 8


@pytest.mark.parametrize("path", [p for p in sorted(glob.glob("model_configs/*.yaml"))])
def test_shipped_configs_fit(path, capsys):
    assert main([path]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "DOES NOT FIT" not in out


def test_paper_configs_param_counts():
    p = make_plan(load_config("model_configs/qwen3_30b_a3b_base_bf16.yaml"))
    assert p.params_total / 1e9 == pytest.approx(30.53, abs=0.01)   # Qwen3-30B-A3B: 30.5B
    p = make_plan(load_config("model_configs/qwen3_4b_base_bf16.yaml"))
    assert p.params_total / 1e9 == pytest.approx(4.02, abs=0.01)    # Qwen3-4B: 4.0B
    p = make_plan(load_config("model_configs/deepseek_r1_distill_qwen_1_5b_bf16.yaml"))
    assert p.params_total / 1e9 == pytest.approx(1.78, abs=0.01)    # R1-Distill-1.5B: 1.78B


def test_nodes_override_and_refusal(capsys, tmp_path):
    cfg = "model_configs/qwen3_30b_a3b_base_bf16.yaml"
    assert main([cfg, "--nodes", "4"]) == 0
    assert "world 32 = tp 2 x pp 1 x dp 16" in capsys.readouterr().out
    # one node of 8 GPUs: 73 GiB per GPU (optimizer states no longer sharded over experts' DP);
    # with a 56 GB budget that does not fit, on 2 nodes it does
    small = tmp_path / "c.yaml"
    small.write_text(open(cfg).read().replace("gpu_memory_gb: 80", "gpu_memory_gb: 56"))
    assert main([str(small), "--nodes", "2"]) == 0
    capsys.readouterr()
    assert main([str(small), "--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.gpu_memory_gb=56" in err[0] and "does not fit" in err[0]
    assert "largest: optimizer states" in err[0]


def test_check_fits_names_largest_part():
    cfg = _cfg(DENSE_ARCH, {"gpu_memory_gb": 1.0})
    p = make_plan(cfg)
    with pytest.raises(Exception, match=r"gpu_memory_gb=1: estimate .* does not fit"):
        check_fits(p, cfg)


def test_hf_config_json_wins_over_model_arch(tmp_path):
    import json

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 16,
        "intermediate_size": 16, "tie_word_embeddings": False}))
    cfg = _cfg({**DENSE_ARCH, "hidden_size": 4096}, {"recompute": "none"}, hf_path=str(hf))
    assert make_plan(cfg).params_total == 1568  # the config.json numbers, not model.arch


def test_nodes_applied_before_the_layout_check(tmp_path, capsys):
    """PP3 needs a world divisible by tp*pp = 6: not the YAML's 2 nodes (16 GPUs), but --nodes 3
    (24 GPUs) is valid and must be accepted (one layout check, after the override)."""
    src = open("model_configs/qwen3_30b_a3b_base_bf16.yaml").read()
    cfg = tmp_path / "pp3.yaml"
    cfg.write_text(src.replace("  pp: 1\n", "  pp: 3\n"))
    assert main([str(cfg), "--nodes", "3"]) == 0
    assert "world 24 = tp 2 x pp 3 x dp 4" in capsys.readouterr().out
    assert main([str(cfg)]) == 2  # its own 2 nodes: 16 GPUs do not divide by 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tp*pp=6" in err[0]


def test_layout_check_shared_by_plan_and_convert():
    from drpo_megatron.models.layout import CLI_NAMES, LayoutError, check_layout, min_world_size

    assert min_world_size(2, 1, 2) == 4 and min_world_size(2, 1, 2, 1) == 2
    with pytest.raises(LayoutError, match=r"^parallel.tp=3: num_attention_heads=32"):
        check_layout(tp=3, num_attention_heads=32)
    with pytest.raises(LayoutError, match=r"^--ep=2 with --etp \(default --tp=2\).*--etp 1"):
        check_layout(tp=2, ep=2, num_experts=4, gloo=True, names=CLI_NAMES)
    check_layout(tp=2, ep=2, etp=1, num_experts=4, gloo=True, world=2, names=CLI_NAMES)
    with pytest.raises(LayoutError, match=r"pp\*ep\*etp=8"):
        check_layout(tp=2, ep=8, etp=1, world=4)
