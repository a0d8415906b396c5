"""FP8 rollout weight quantizer: bit-exact against a straightforward per-block reference, the
e4m3 round-trip error bound, the BF16/FP8 name rule, the checkpoint layout and the emulation.

Error bound (derived in ``drpo_megatron/weights/fp8.py``): with ``y = w / scale_inv``
(``|y| <= 448``), e4m3 keeps 3 mantissa bits, so rounding a normal ``|y| >= 2**-6`` errs by at
most half an ulp = ``2**-4 * 2**floor(log2|y|) <= 2**-4 * |y|``; subnormals (spacing ``2**-9``)
err by at most ``2**-10``.  In weight units: ``|w - dq| <= max(2**-4 |w|, 2**-10 scale_inv)``,
plus fp32 rounding of the division and the product (a few 2**-24 relative).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from drpo_megatron.weights import fp8 as F
from drpo_megatron.weights.fp8 import (BLOCK, FP8_E4M3_MAX, dequantize_blockwise,
                                       emulate_fp8_named_tensors, fake_quantize_blockwise,
                                       fp8_modules_to_not_convert, fp8_quantization_config,
                                       is_fp8_quantizable, quantization_error_stats,
                                       quantize_blockwise, quantize_named_tensors)

E4M3 = torch.float8_e4m3fn
SHAPES = [(1, 1), (127, 129), (200, 300), (256, 128), (128, 256), (3, 1000), (385, 7)]


def reference_quantize(w: torch.Tensor, block=(128, 128)):
    """The obvious implementation: Python loops over blocks, fp32 math, torch's e4m3 cast."""
    bm, bn = block
    m, n = w.shape
    mb, nb = math.ceil(m / bm), math.ceil(n / bn)
    q = torch.empty(m, n, dtype=E4M3)
    s = torch.empty(mb, nb, dtype=torch.float32)
    for i in range(mb):
        for j in range(nb):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].to(torch.float32)
            amax = blk.abs().max()
            s_ij = torch.clamp(amax, min=1e-12) / 448.0
            s[i, j] = s_ij
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s_ij).to(E4M3)
    return q, s


def reference_dequantize(q: torch.Tensor, s: torch.Tensor, block=(128, 128)):
    bm, bn = block
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
            out[sl] = q[sl].to(torch.float32) * s[i, j]
    return out


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def assert_same_quant(got, want):
    (q, s), (rq, rs) = got, want
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.equal(bits(q), bits(rq)), "fp8 payload differs from the reference"
    assert torch.equal(s, rs), "inverse scales differ from the reference"


def randw(shape, dtype=torch.bfloat16, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------ reference, bit-exact
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_reference_bit_exact(shape, dtype):
    w = randw(shape, dtype, seed=hash(shape) % 1000)
    q, s = quantize_blockwise(w)
    assert_same_quant((q, s), reference_quantize(w))
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    dq = dequantize_blockwise(q, s, dtype=torch.float32)
    assert torch.equal(dq, reference_dequantize(q, s))
    # fake-quantize == dequantize(quantize) in w's dtype, bitwise
    fq = fake_quantize_blockwise(w)
    assert fq.dtype == dtype and fq.shape == w.shape
    assert torch.equal(fq, dequantize_blockwise(q, s, dtype=dtype))


def test_zero_blocks_and_outlier():
    w = randw((300, 260), torch.bfloat16, seed=3)
    w[:128, :128] = 0                 # an all-zero block
    w[256:, 256:] = 0                 # an all-zero partial edge block (44 x 4)
    w[130, 140] = 1.0e4               # a huge outlier in block (1, 1)
    w[5, 200] = -3.0e-30              # a tiny value next to normal ones (flushes to 0)
    q, s = quantize_blockwise(w)
    assert_same_quant((q, s), reference_quantize(w))
    assert torch.all(torch.isfinite(s)) and torch.all(s > 0)
    assert s[0, 0] == pytest.approx(1e-12 / 448) and s[2, 2] == pytest.approx(1e-12 / 448)
    dq = dequantize_blockwise(q, s, dtype=torch.float32)
    assert torch.equal(dq[:128, :128], torch.zeros(128, 128))      # zeros stay exact zeros
    assert torch.equal(dq[256:, 256:], torch.zeros(44, 4))
    assert float(bits(q)[130, 140]) == 0x7E                         # +448
    assert float(dq[130, 140]) == pytest.approx(float(w[130, 140]), rel=2**-22)
    # the outlier only coarsens its own block: the others keep full e4m3 resolution
    rel = (dq - w.float()).abs() / w.float().abs().clamp_min(1e-30)
    out_blk = torch.zeros_like(rel, dtype=torch.bool)
    out_blk[128:256, 128:256] = True
    normal = (~out_blk) & (w.float().abs() > 1e-3)
    assert float(rel[normal].max()) <= 2**-4 * (1 + 2**-18)


def test_all_zero_and_single_element():
    for shape in [(1, 1), (128, 128), (129, 1)]:
        w = torch.zeros(shape, dtype=torch.bfloat16)
        q, s = quantize_blockwise(w)
        assert_same_quant((q, s), reference_quantize(w))
        assert torch.equal(dequantize_blockwise(q, s), w)
    w = torch.tensor([[-0.3]], dtype=torch.float32)
    q, s = quantize_blockwise(w)
    assert float(bits(q)) == 0xFE  # -448: a lone element is its block's amax
    assert float(dequantize_blockwise(q, s, dtype=torch.float32)) == pytest.approx(-0.3, rel=1e-6)


def test_multiple_row_chunks(monkeypatch):
    """The CPU path processes block rows in chunks; a tiny chunk size exercises the seams."""
    monkeypatch.setattr(F, "_CHUNK_BYTES", 1)  # one 128-row block row per chunk
    w = randw((700, 300), torch.bfloat16, seed=7)
    q, s = quantize_blockwise(w)
    assert_same_quant((q, s), reference_quantize(w))
    assert torch.equal(dequantize_blockwise(q, s, dtype=torch.float32),
                       reference_dequantize(q, s))
    assert torch.equal(fake_quantize_blockwise(w), dequantize_blockwise(q, s))


def test_other_block_size_and_non_contiguous():
    w = randw((300, 200), torch.float32, seed=11)
    assert_same_quant(quantize_blockwise(w, (64, 32)), reference_quantize(w, (64, 32)))
    wt = w.t()  # non-contiguous view
    assert_same_quant(quantize_blockwise(wt), reference_quantize(wt.contiguous()))


# --------------------------------------------------------------------- error bound
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_within_e4m3_error(dtype):
    g = torch.Generator().manual_seed(5)
    # heavy-tailed magnitudes over ~12 binades so that many elements land in e4m3 subnormals
    w = (torch.randn(384, 640, generator=g) * torch.exp(3 * torch.randn(384, 640, generator=g)))
    w = w.to(dtype)
    q, s = quantize_blockwise(w)
    dq = dequantize_blockwise(q, s, dtype=torch.float32)
    wf = w.float()
    s_full = s.repeat_interleave(128, 0)[:384].repeat_interleave(128, 1)[:, :640]
    bound = torch.maximum(2**-4 * wf.abs(), 2**-10 * s_full) * (1 + 2**-20)
    err = (dq - wf).abs()
    assert torch.all(err <= bound), float((err / bound).max())
    y = wf.abs() / s_full
    assert (y < 2**-6).sum() > 1000, "test should exercise e4m3 subnormals"
    # the bound is tight: normal values do reach (nearly) a half ulp of relative error
    normal = y >= 2**-6
    assert float((err[normal] / wf.abs()[normal]).max()) > 0.9 * 2**-4
    # every block's max maps to +-448 and comes back within fp32 rounding
    assert int(bits(q).bitwise_and(0x7F).max()) == 0x7E
    assert not torch.any(bits(q).bitwise_and(0x7F) == 0x7F), "no NaN encodings"
    stats = quantization_error_stats(w, dq)
    assert stats["max_abs_err"] == pytest.approx(float(err.max()))
    assert 0 < stats["rel_fro_err"] < 2**-4


def test_decoder_matches_torch_for_all_bytes():
    """The CPU e4m3 -> fp32 bit-remapping decoder agrees with torch's cast on all 256 codes
    (NaN codes included, handled separately)."""
    q = torch.arange(256, dtype=torch.uint8).view(E4M3).reshape(2, 128)
    s = torch.ones(1, 1)
    got = dequantize_blockwise(q, s, dtype=torch.float32)
    want = q.to(torch.float32)
    nan = torch.isnan(want)
    assert nan.sum() == 2 and torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))  # -0.0 kept


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        quantize_blockwise(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize_blockwise(torch.tensor([[1.0, float("inf")]]))
    q, s = quantize_blockwise(torch.ones(130, 5))
    with pytest.raises(ValueError, match="expected \\(2, 1\\)"):
        dequantize_blockwise(q, s[:1])
    bad = [("model.layers.0.self_attn.q_proj.weight", torch.tensor([[float("nan")]]))]
    with pytest.raises(ValueError, match="q_proj"):
        list(quantize_named_tensors(bad))


# ------------------------------------------------------------------------- name rule
M = torch.zeros(8, 8)
V = torch.zeros(8)
NAME_RULE = [
    ("model.layers.0.self_attn.q_proj.weight", M, True),
    ("model.layers.0.self_attn.k_proj.weight", M, True),
    ("model.layers.0.self_attn.v_proj.weight", M, True),
    ("model.layers.0.self_attn.o_proj.weight", M, True),
    ("model.layers.3.mlp.gate_proj.weight", M, True),
    ("model.layers.3.mlp.up_proj.weight", M, True),
    ("model.layers.3.mlp.down_proj.weight", M, True),
    ("model.layers.5.mlp.experts.0.gate_proj.weight", M, True),
    ("model.layers.5.mlp.experts.127.up_proj.weight", M, True),
    ("model.layers.5.mlp.experts.17.down_proj.weight", M, True),
    ("model.layers.5.mlp.shared_expert.down_proj.weight", M, True),
    ("model.layers.5.mlp.gate.weight", M, False),                  # MoE router
    ("model.layers.5.mlp.shared_expert_gate.weight", torch.zeros(1, 8), False),
    ("model.embed_tokens.weight", M, False),
    ("lm_head.weight", M, False),
    ("model.norm.weight", V, False),
    ("model.layers.0.input_layernorm.weight", V, False),
    ("model.layers.0.post_attention_layernorm.weight", V, False),
    ("model.layers.0.self_attn.q_norm.weight", V, False),
    ("model.layers.0.self_attn.k_norm.weight", V, False),
    ("model.layers.0.self_attn.q_proj.bias", V, False),
    ("model.layers.0.self_attn.q_proj.weight", V, False),          # 1-D: not a matrix
    ("model.layers.0.self_attn.q_proj.weight", M.to(E4M3), False),  # already FP8
    ("model.layers.0.self_attn.q_proj.weight_scale_inv", M, False),
    ("model.layers.0.linear_attn.in_proj_qkvz.weight", M, False),  # other linears stay BF16
    ("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(2, 8, 8), False),  # fused 3-D
]


@pytest.mark.parametrize("name,tensor,expected", NAME_RULE,
                         ids=[f"{n}-{tuple(t.shape)}" for n, t, _ in NAME_RULE])
def test_name_rule(name, tensor, expected):
    assert is_fp8_quantizable(name, tensor) is expected


# ------------------------------------------------------------------- checkpoint layout
def tiny_moe_state(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    h, inter, vocab = 200, 72, 50
    sd = {"model.embed_tokens.weight": r(vocab, h)}
    for p, shape in [("q_proj", (256, h)), ("k_proj", (64, h)), ("v_proj", (64, h)),
                     ("o_proj", (h, 256))]:
        sd[f"model.layers.0.self_attn.{p}.weight"] = r(*shape)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32, dtype=dtype)
    sd["model.layers.0.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    sd["model.layers.0.mlp.gate.weight"] = r(4, h)
    for e in range(4):
        sd[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = r(inter, h)
        sd[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = r(inter, h)
        sd[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = r(h, inter)
    sd["model.norm.weight"] = torch.ones(h, dtype=dtype)
    sd["lm_head.weight"] = r(vocab, h)
    return sd


def test_fp8_checkpoint_layout():
    sd = tiny_moe_state(torch.float32)
    out = list(quantize_named_tensors(sd.items()))
    names = [n for n, _ in out]
    assert len(names) == len(set(names))
    got = dict(out)
    n_quant = 0
    for name, t in sd.items():
        if is_fp8_quantizable(name, t):
            n_quant += 1
            scale = name[: -len("weight")] + "weight_scale_inv"
            assert names.index(scale) == names.index(name) + 1   # scale right after its weight
            q, s = got[name], got[scale]
            assert q.dtype == E4M3 and q.shape == t.shape
            assert s.dtype == torch.float32
            assert s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            assert_same_quant((q, s), reference_quantize(t))
        else:
            assert got[name].dtype == torch.bfloat16                # passed through as BF16
            assert torch.equal(got[name], t.to(torch.bfloat16))
    assert n_quant == 4 + 3 * 4
    assert len(out) == len(sd) + n_quant
    assert {n for n in sd if not is_fp8_quantizable(n, sd[n])} == {
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate.weight",
        "model.norm.weight", "lm_head.weight"}
    # passthrough_dtype=None leaves the other tensors alone
    kept = dict(quantize_named_tensors(sd.items(), passthrough_dtype=None))
    assert kept["model.norm.weight"] is sd["model.norm.weight"]


def test_fp8_layout_saves_with_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = tiny_moe_state()
    out = dict(quantize_named_tensors(sd.items()))
    path = tmp_path / "model.safetensors"
    safetensors.save_file(out, str(path))
    back = safetensors.load_file(str(path))
    assert back.keys() == out.keys()
    for k, v in out.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        if v.dtype == E4M3:
            assert torch.equal(bits(back[k]), bits(v))
        else:
            assert torch.equal(back[k], v)
    # on-disk dtypes as SGLang's loader sees them
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    qn = "model.layers.0.mlp.experts.3.down_proj"
    assert header[qn + ".weight"]["dtype"] == "F8_E4M3"
    assert header[qn + ".weight_scale_inv"]["dtype"] == "F32"
    assert header[qn + ".weight_scale_inv"]["shape"] == [2, 1]
    assert header["model.layers.0.mlp.gate.weight"]["dtype"] == "BF16"


def test_emulation_keeps_dtype_shape_and_passthrough():
    for dtype in (torch.bfloat16, torch.float32):
        sd = tiny_moe_state(dtype)
        out = list(emulate_fp8_named_tensors(sd.items()))
        assert [n for n, _ in out] == list(sd)                     # same names, same order
        for name, t in out:
            src = sd[name]
            assert t.dtype == src.dtype and t.shape == src.shape
            if is_fp8_quantizable(name, src):
                q, s = quantize_blockwise(src)
                assert torch.equal(t, dequantize_blockwise(q, s, dtype=dtype))
                assert not torch.equal(t, src)                     # really carries FP8 error
                st = quantization_error_stats(src, t)
                assert 0 < st["rel_fro_err"] < 2**-4
            else:
                assert t is src                                    # untouched, bitwise


def test_quantization_config():
    cfg = fp8_quantization_config()
    assert cfg["quant_method"] == "fp8" and cfg["fmt"] == "e4m3"
    assert cfg["activation_scheme"] == "dynamic"
    assert cfg["weight_block_size"] == [128, 128] == list(BLOCK)
    assert {"lm_head", "mlp.gate"} <= set(cfg["modules_to_not_convert"])
    assert json.loads(json.dumps(cfg)) == cfg
    sd = tiny_moe_state()
    mods = fp8_modules_to_not_convert(sd.items())
    assert mods == ["model.embed_tokens", "model.layers.0.mlp.gate", "lm_head"]
    assert fp8_quantization_config(mods)["modules_to_not_convert"] == mods
    assert FP8_E4M3_MAX == torch.finfo(E4M3).max


def test_error_stats():
    w = torch.tensor([[3.0, -4.0]])
    st = quantization_error_stats(w, torch.tensor([[3.0, -4.5]]))
    assert st == {"max_abs_err": 0.5, "rel_fro_err": pytest.approx(0.1), "max_abs": 4.0}
    z = torch.zeros(2, 2)
    assert quantization_error_stats(z, z)["rel_fro_err"] == 0.0
    with pytest.raises(ValueError):
        quantization_error_stats(z, torch.zeros(2, 3))
