"""HF checkpoint writer: layout, atomic replace, and the rollout-precision transforms."""

import json

import pytest
import torch
from safetensors.torch import load_file

from drpo_megatron.weights import fp4, fp8
from drpo_megatron.weights.hf_export import ROLLOUT_PRECISIONS, write_hf_checkpoint


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"old weights: must not be copied")
    return src


def _named():
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(300, 200, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(200, 300, generator=g)),
        ("model.layers.0.mlp.gate.weight", torch.randn(4, 200, generator=g)),
        ("model.layers.0.mlp.experts.1.down_proj.weight", torch.randn(200, 130, generator=g)),
        ("model.norm.weight", torch.randn(200, generator=g)),
    ]


def test_bf16_round_trip_and_atomic_replace(tmp_path, source):
    out = tmp_path / "v1"
    write_hf_checkpoint(iter(_named()), out, source_dir=source)
    got = load_file(str(out / "model.safetensors"))
    for name, t in _named():
        assert torch.equal(got[name], t), name
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())
    # replacing: a second write fully replaces the directory, nothing temporary left behind
    write_hf_checkpoint(iter(_named()[:1]), out, source_dir=source)
    assert list(load_file(str(out / "model.safetensors"))) == ["model.embed_tokens.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "v1"]


def test_fp8_emulated_quantizes_only_linear_weights(tmp_path, source):
    out = write_hf_checkpoint(iter(_named()), tmp_path / "e", source_dir=source,
                              precision="fp8_emulated")
    got = load_file(str(out / "model.safetensors"))
    for name, t in _named():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            ref = fp8.dequantize_blockwise(*fp8.quantize_blockwise(t), dtype=t.dtype)
            assert torch.equal(got[name], ref) and not torch.equal(got[name], t), name
        else:
            assert torch.equal(got[name], t), name  # router, embeddings, norms untouched


@pytest.mark.parametrize("precision,fmt", [("nvfp4_emulated", "nvfp4"), ("mxfp4_emulated", "mxfp4")])
def test_fp4_emulated_quantizes_only_linear_weights(tmp_path, source, precision, fmt):
    out = write_hf_checkpoint(iter(_named()), tmp_path / "e4", source_dir=source,
                              precision=precision)
    got = load_file(str(out / "model.safetensors"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name, t in _named():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            ref = fp4.dequantize_fp4(fp4.quantize_fp4(t, fmt), dtype=t.dtype)
            assert torch.equal(got[name], ref) and not torch.equal(got[name], t), name
        else:
            assert torch.equal(got[name], t), name  # router, embeddings, norms untouched


def test_every_rollout_precision_has_a_sync_check_tolerance():
    from drpo_megatron.rollout.verify import DEFAULT_ATOL

    assert set(ROLLOUT_PRECISIONS) <= set(DEFAULT_ATOL)


def test_fp8_layout_and_config(tmp_path, source):
    out = write_hf_checkpoint(iter(_named()), tmp_path / "f", source_dir=source, precision="fp8")
    got = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert got[q + ".weight"].dtype == torch.float8_e4m3fn
    assert got[q + ".weight_scale_inv"].shape == (2, 3)
    assert got["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]


def test_unknown_precision(tmp_path, source):
    with pytest.raises(ValueError, match="rollout.precision='fp4'"):
        write_hf_checkpoint(iter(_named()), tmp_path / "x", source_dir=source, precision="fp4")
