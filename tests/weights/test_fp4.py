"""NVFP4 / MXFP4 emulation against an independent reference.

The reference decodes every code point from its bit fields (16 e2m1 codes, 255 finite e4m3
codes), rounds by explicit nearest-value search with ties to the even mantissa bit, and computes
scales block by block in Python / numpy float32 -- no code shared with
``drpo_megatron.weights.fp4`` (whose rounding divides by the grid spacing and uses
``torch.round``).  Codes, scales and dequantized values must agree bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drpo_megatron.weights import fp4
from drpo_megatron.weights.fp4 import (E2M1_VALUES, dequantize_fp4, e2m1_decode,
                                       emulate_fp4_named_tensors, fake_quantize_fp4, quantize_fp4,
                                       round_to_e2m1)
from drpo_megatron.weights.hf_export import ROLLOUT_PRECISIONS, precision_transform


# ------------------------------------------------------------------------------ reference
def ref_e2m1_table() -> list[tuple[int, float]]:
    """(code, value) for the 16 e2m1 codes: s | ee | m, bias 1, e == 0 subnormal."""
    out = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        out.append((code, -mag if s else mag))
    return out


def ref_e4m3_table() -> list[tuple[int, float]]:
    """(code, value) for the non-negative finite e4m3fn codes (s=0; 0x7F is NaN)."""
    out = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        out.append((code, m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)))
    return out


E2M1 = ref_e2m1_table()
E4M3 = ref_e4m3_table()


def ref_nearest(x: float, table, negative_ok=True) -> tuple[int, float]:
    """Nearest table value to ``x``; ties to the code with mantissa bit 0; for x == 0 the code
    whose sign matches x's."""
    best = min(abs(x - v) for _, v in table)
    cands = [(c, v) for c, v in table if abs(x - v) == best]
    if len(cands) > 1:
        even = [(c, v) for c, v in cands if c & 1 == 0]
        cands = even or cands
    if len(cands) > 1:  # +0 and -0
        neg = math.copysign(1.0, x) < 0
        cands = [(c, v) for c, v in cands if (c >> 3 == 1) == neg] or cands
    return cands[0]


def ref_quantize(w: torch.Tensor, fmt: str):
    """-> codes [M, N] int, stored scale bytes [M, nb] int, decode scales [M, nb] float32,
    global scale (float32 or None)."""
    block = {"nvfp4": 16, "mxfp4": 32}[fmt]
    x = w.detach().to(torch.float32).numpy()
    m, n = x.shape
    nb = -(-n // block)
    codes = np.zeros((m, n), dtype=np.int64)
    sbytes = np.zeros((m, nb), dtype=np.int64)
    dec = np.zeros((m, nb), dtype=np.float32)
    g = None
    if fmt == "nvfp4":
        g = np.float32(max(float(np.abs(x).max()), 1e-12)) / np.float32(6 * 448)
    for i in range(m):
        for b in range(nb):
            blk = x[i, b * block:(b + 1) * block]
            amax = np.float32(np.abs(blk).max())
            if fmt == "nvfp4":
                target = float(amax / np.float32(6) / g)
                code, val = ref_nearest(target, E4M3)
                sbytes[i, b] = code
                d = np.float32(val) * g
            else:
                if amax == 0:
                    e = -127
                else:
                    e = 0
                    while 2.0 ** (e + 1) <= amax:
                        e += 1
                    while 2.0 ** e > amax:
                        e -= 1
                    e = max(-127, min(127, e - 2))
                sbytes[i, b] = e + 127
                d = np.float32(2.0 ** e)
            dec[i, b] = d
            for j, v in enumerate(blk):
                y = float(np.float32(v) / d) if d > 0 else 0.0 * float(v)
                codes[i, b * block + j] = ref_nearest(y, E2M1)[0]
    return codes, sbytes, dec, g


def ref_dequantize(codes, dec, block):
    value = dict(E2M1)
    m, n = codes.shape
    out = np.zeros((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            out[i, j] = np.float32(value[int(codes[i, j])]) * dec[i, j // block]
    return out


def check_against_reference(w: torch.Tensor, fmt: str):
    block = fp4.FP4_FORMATS[fmt]
    codes, sbytes, dec, g = ref_quantize(w, fmt)
    qt = quantize_fp4(w, fmt)
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == w.shape
    assert torch.equal(qt.codes.to(torch.int64), torch.from_numpy(codes)), "e2m1 codes differ"
    want_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.float8_e8m0fnu
    assert qt.block_scale.dtype == want_dtype
    assert torch.equal(qt.block_scale.view(torch.uint8).to(torch.int64), torch.from_numpy(sbytes))
    if fmt == "nvfp4":
        assert float(qt.global_scale) == float(g)
    else:
        assert qt.global_scale is None
        # torch's own E8M0 decoding of the stored scale is the power of two used
        assert torch.equal(qt.block_scale.to(torch.float32), torch.from_numpy(dec))
    want = torch.from_numpy(ref_dequantize(codes, dec, block))
    assert torch.equal(dequantize_fp4(qt, torch.float32), want)
    fq = fake_quantize_fp4(w, fmt)
    assert fq.dtype == w.dtype and fq.shape == w.shape
    assert torch.equal(fq, want.to(w.dtype))
    return qt


def randw(shape, dtype=torch.float32, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------------------ the grid
def test_e2m1_code_points():
    assert [v for c, v in E2M1[:8]] == list(E2M1_VALUES)
    codes = torch.arange(16, dtype=torch.uint8)
    got = e2m1_decode(codes)
    want = torch.tensor([v for _, v in E2M1])
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.tensor([c >= 8 for c in range(16)]))  # -0.0 kept
    # every code point rounds to itself
    assert torch.equal(round_to_e2m1(want), want)


def test_round_half_to_even_and_saturation():
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    y = torch.tensor(list(ties), dtype=torch.float32)
    assert round_to_e2m1(y).tolist() == list(ties.values())
    assert round_to_e2m1(-y).tolist() == [-v for v in ties.values()]
    assert round_to_e2m1(torch.tensor([6.0, 6.9, 7.0, 1e30, -8.0])).tolist() == [6, 6, 6, 6, -6]
    # a dense sweep agrees with the enumeration (incl. just off every tie)
    xs = torch.linspace(-7.5, 7.5, 6001)
    eps = torch.tensor([t + d for t in ties for d in (-1e-6, 1e-6)] + [-t for t in ties])
    xs = torch.cat([xs, eps])
    want = torch.tensor([ref_nearest(float(x), E2M1)[1] for x in xs])
    assert torch.equal(round_to_e2m1(xs), want)


def test_torch_float4_dtype_if_castable():
    """torch's float4_e2m1fn_x2 (two codes per byte, low nibble first) as a second reference,
    where this torch build can cast it (the CPU build of torch 2.13 cannot: storage only)."""
    dt = getattr(torch, "float4_e2m1fn_x2", None)
    if dt is None:
        pytest.skip("torch has no float4_e2m1fn_x2")
    packed = torch.arange(256, dtype=torch.uint8)
    try:
        got = packed.view(dt).to(torch.float32)
    except (NotImplementedError, RuntimeError) as e:
        pytest.skip(f"float4_e2m1fn_x2 cannot be cast on this build ({str(e)[:60]})")
    lo, hi = e2m1_decode(packed & 15), e2m1_decode(packed >> 4)
    assert torch.equal(got.flatten(), torch.stack([lo, hi], -1).flatten())


# ------------------------------------------------------------------ bit-exact vs reference
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape,dtype", [((8, 64), torch.float32), ((5, 50), torch.bfloat16),
                                         ((3, 33), torch.float16), ((1, 1), torch.float32)])
def test_matches_reference(fmt, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    # heavy-tailed magnitudes: blocks of very different scale, subnormal-ish e2m1 values
    w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    check_against_reference(w.to(dtype), fmt)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_zeros_sign_and_block_max(fmt):
    block = fp4.FP4_FORMATS[fmt]
    # all-zero tensor
    z = torch.zeros(3, 2 * block)
    qt = check_against_reference(z, fmt)
    assert torch.equal(qt.codes, torch.zeros_like(qt.codes))
    assert torch.equal(dequantize_fp4(qt, torch.float32), z)
    # an all-zero block next to a normal one; a partial last block
    w = randw((4, 2 * block + 5), seed=1)
    w[:, :block] = 0
    qt = check_against_reference(w, fmt)
    assert torch.equal(fake_quantize_fp4(w, fmt)[:, :block], torch.zeros(4, block))
    # sign symmetry
    assert torch.equal(fake_quantize_fp4(-w, fmt), -fake_quantize_fp4(w, fmt))
    # a block of exact e2m1 values times a power of two (max 6 * 2**k): the block max is code 7
    vals = torch.tensor(E2M1_VALUES * (block // 8)) * torch.tensor([1.0, -1.0]).repeat(block // 2)
    w = (vals * 2.0 ** -5).reshape(1, block)
    qt = check_against_reference(w, fmt)
    assert int(qt.codes[0].max()) in (7, 15) and 7 in (qt.codes[0] & 7).tolist()
    got = dequantize_fp4(qt, torch.float32)
    if fmt == "mxfp4":  # power-of-two scale 2**-5: exact
        assert torch.equal(got, w)
        assert float(qt.block_scale.to(torch.float32)) == 2.0 ** -5
    else:  # e4m3 scale 448 times the fp32 global scale: exact up to fp32 rounding
        assert float(qt.block_scale.to(torch.float32)) == 448.0
        assert torch.allclose(got, w, rtol=2e-7, atol=0)
    assert float(got.abs().max()) == pytest.approx(6 * 2.0 ** -5, rel=2e-7)


def test_nvfp4_scale_underflow_and_mxfp4_saturation():
    # NVFP4: a block 1e-8 times smaller than the tensor amax gets e4m3 scale 0 -> zeros
    w = torch.ones(1, 32)
    w[0, 16:] = 1e-8
    qt = check_against_reference(w, "nvfp4")
    assert qt.block_scale.view(torch.uint8)[0, 1] == 0
    assert torch.equal(fake_quantize_fp4(w, "nvfp4")[0, 16:], torch.zeros(16))
    # MXFP4: block max 7 -> scale 2**(2-2) = 1, 7 saturates to 6 (the spec's clamp)
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 7.0, 5.0
    qt = check_against_reference(w, "mxfp4")
    assert fake_quantize_fp4(w, "mxfp4")[0, :2].tolist() == [6.0, 4.0]  # 5 ties to even (4)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_error_bound(fmt):
    """|w - fq(w)| <= max(|w|, scale) / 4 (module docstring), scale = the block decode scale."""
    block = fp4.FP4_FORMATS[fmt]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g) * torch.exp(torch.randn(96, 256, generator=g))
    qt = quantize_fp4(w, fmt)
    dq = dequantize_fp4(qt, torch.float32)
    d = (qt.block_scale.to(torch.float32) * (qt.global_scale if fmt == "nvfp4" else 1.0))
    d_full = d.repeat_interleave(block, 1)[:, :256]
    bound = torch.maximum(w.abs(), d_full) / 4 * (1 + 2 ** -20)
    err = (dq - w).abs()
    assert torch.all(err <= bound), float((err / bound).max())
    rel = float((dq - w).norm() / w.norm())
    assert 0.02 < rel < 0.25  # a real 4-bit error (FP8's is < 2**-4 per element)
    assert rel > float((fp4_fp8_ref(w) - w).norm() / w.norm()) * 2


def fp4_fp8_ref(w):
    from drpo_megatron.weights.fp8 import fake_quantize_blockwise

    return fake_quantize_blockwise(w)


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp4(torch.ones(4))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        fake_quantize_fp4(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp4(torch.tensor([[1.0, float("nan")]]), "mxfp4")
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize_fp4(torch.tensor([[1.0, float("inf")]]), "nvfp4")
    with pytest.raises(ValueError, match="choose one of"):
        quantize_fp4(torch.ones(2, 2), "fp4")
    bad = [("model.layers.0.mlp.experts.0.up_proj.weight", torch.tensor([[float("nan")]]))]
    with pytest.raises(ValueError, match="up_proj"):
        list(emulate_fp4_named_tensors(bad))


@pytest.mark.parametrize("precision,fmt", [("nvfp4_emulated", "nvfp4"),
                                           ("mxfp4_emulated", "mxfp4")])
def test_rollout_precision_quantizes_the_fp8_modules(precision, fmt):
    """Registered in ROLLOUT_PRECISIONS; the same modules as FP8 are quantized, the router,
    embeddings, lm_head and norms pass through as the same objects."""
    assert precision in ROLLOUT_PRECISIONS
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.embed_tokens.weight": torch.randn(50, 64, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 64, generator=g),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(64, 32, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "lm_head.weight": torch.randn(50, 64, generator=g),
    }
    out = list(precision_transform(precision)(iter(sd.items())))
    assert [n for n, _ in out] == list(sd)
    for name, t in out:
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            assert torch.equal(t, fake_quantize_fp4(sd[name], fmt)) and not torch.equal(t, sd[name])
        else:
            assert t is sd[name], name
