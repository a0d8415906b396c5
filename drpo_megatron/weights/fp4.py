"""4-bit rollout weights, emulated: NVFP4 and MXFP4 quantize-then-dequantize (pure torch).

The harsher sibling of ``fp8_emulated`` (:mod:`drpo_megatron.weights.fp8`): at every weight sync
the rollout server receives each linear weight as it would hold it in a 4-bit checkpoint,
dequantized back to the weight's own dtype, so the server runs in BF16 but carries exactly the
4-bit weight error.  The same modules are quantized as for FP8 (:func:`fp8.is_fp8_quantizable`:
attention and MLP / expert projections); the MoE router, embeddings, ``lm_head``, norms and
biases are passed through untouched.  Used by ``rollout.precision: nvfp4_emulated`` /
``mxfp4_emulated`` (``weights/hf_export.py``: ``ROLLOUT_PRECISIONS``).

Element format (both): FP4 E2M1 -- 1 sign, 2 exponent (bias 1), 1 mantissa bit, no inf/NaN.
The 8 magnitudes, by code 0..7: ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (code bit 3 is the sign).  Values
are rounded to the nearest magnitude, ties to the code with an even mantissa bit (IEEE
round-half-to-even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and
saturate at +-6.  Blocks run along the input dimension (the GEMM reduction axis) of a weight
``[out, in]``: elements ``w[i, b*B : (b+1)*B]`` share a scale; a partial last block is scaled
by the amax of its real elements.

NVFP4 (NVIDIA Blackwell; ``B = 16``)
    Two-level scale: an FP32 per-tensor scale ``g = amax(|W|) / (6 * 448)`` and per block an
    FP8-E4M3 scale ``s_b = e4m3(amax_b / 6 / g)`` (round to nearest even; <= 448 because
    ``amax_b <= amax(|W|)``).  The block's decode scale is ``d_b = float(s_b) * g`` (fp32) and
    ``dequant = e2m1(w / d_b) * d_b``.  A block whose ``s_b`` underflows to 0 (its amax below
    ~2**-10 / 448 of the tensor's) or is all zeros dequantizes to zeros.  This is the scheme of
    NVIDIA's NVFP4 recipe (Transformer Engine, ModelOpt checkpoints: ``weight`` packed e2m1,
    ``weight_scale`` e4m3 per 16, ``weight_scale_2`` fp32).  Rounding ``s_b`` to e4m3 can make
    ``|w / d_b|`` exceed 6 by up to 1/16: those values saturate to 6.

MXFP4 (OCP Microscaling spec v1.0; ``B = 32``)
    One power-of-two scale per block, stored as E8M0 (an exponent, bias 127):
    ``X_b = 2**(floor(log2(amax_b)) - 2)`` (2 = the exponent of e2m1's largest power of two,
    4), the exponent clamped to [-127, 127]; all-zero blocks get ``2**-127``.
    ``dequant = e2m1(w / X_b) * X_b``.  ``|w / X_b|`` lies in [0, 8); values in (6, 8) saturate
    to 6 (the spec's rule), so MXFP4 is coarser than NVFP4: larger blocks, a scale that may waste
    up to one binade.

Error (what the tests check): for ``|y| = |w| / scale`` in [1, 6] rounding errs by at most a
quarter of ``|y|`` (half the spacing 0.5 / 1 / 2 of [1,2) / [2,4) / [4,6]); below 1 by at most
0.25 absolute (spacing 0.5); saturation adds up to 2 (MXFP4) or 6/16 (NVFP4) in y units.

``torch.float4_e2m1fn_x2`` (torch >= 2.8) is a storage-only dtype on CPU (no casts), so the
rounding here is written out; the tests hold it to an explicit enumeration of the 16 code points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from drpo_megatron.weights.fp8 import FP8_E4M3_MAX, emulate_named_tensors

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP4_FORMATS",
    "Fp4Quantized",
    "round_to_e2m1",
    "e2m1_decode",
    "quantize_fp4",
    "dequantize_fp4",
    "fake_quantize_fp4",
    "emulate_fp4_named_tensors",
    "emulate_nvfp4_named_tensors",
    "emulate_mxfp4_named_tensors",
]

E2M1_MAX = 6.0
#: Magnitudes of the e2m1 codes 0..7 (code | 8 is the negative value).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Elements per scale block, along the input dimension.
FP4_FORMATS = {"nvfp4": 16, "mxfp4": 32}
#: floor(log2(6)): the exponent of e2m1's largest power of two, subtracted from a block's
#: exponent by the MX spec so that the block maximum lands in [4, 8).
_E2M1_EMAX = 2
#: E8M0 exponent range (bias 127; code 255 is NaN).
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127
#: Floor on the NVFP4 per-tensor amax so an all-zero tensor gets a finite, non-zero scale.
_AMAX_FLOOR = 1e-12


@dataclass
class Fp4Quantized:
    """A quantized ``[M, N]`` weight.  ``codes``: uint8 [M, N], one e2m1 code (0..15) per
    element (unpacked; bit 3 = sign).  ``block_scale``: [M, ceil(N / B)] -- float8_e4m3fn for
    NVFP4, float8_e8m0fnu for MXFP4.  ``global_scale``: fp32 scalar for NVFP4, None for MXFP4."""

    fmt: str
    codes: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor | None


def _check_fmt(fmt: str) -> int:
    if fmt not in FP4_FORMATS:
        raise ValueError(f"fp4 format {fmt!r}: choose one of {sorted(FP4_FORMATS)}")
    return FP4_FORMATS[fmt]


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.element_size() < 2:
        raise ValueError(f"expected a bf16/fp16/fp32 weight, got {w.dtype}")


def round_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """fp32 ``y`` -> the nearest e2m1 value (fp32), ties to even mantissa, saturating at +-6.

    The e2m1 grid has spacing 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]; dividing by the
    spacing (a power of two: exact) puts the grid on the integers, where ``torch.round`` rounds
    half to even -- and an even multiple of the spacing is exactly a code with mantissa bit 0.
    """
    a = y.abs()
    spacing = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    q = torch.round(a / spacing).mul_(spacing).clamp_(max=E2M1_MAX)
    return torch.copysign(q, y)


def _e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """e2m1 values (as produced by :func:`round_to_e2m1`) -> uint8 codes (bit 3 = sign)."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=q.device)
    mag = torch.searchsorted(grid, q.abs().contiguous())
    return (mag | (torch.signbit(q).to(torch.int64) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes -> fp32 values (code 8 is -0.0)."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 copy of ``w`` [M, N] zero-padded to [M, nb, block]."""
    m, n = w.shape
    nb = -(-n // block)
    x = torch.zeros((m, nb * block), dtype=torch.float32, device=w.device)
    x[:, :n].copy_(w)
    return x.view(m, nb, block)


def _decode_scales(x: torch.Tensor, fmt: str):
    """``x`` [M, nb, B] fp32 -> ``(decode scale [M, nb] fp32, stored block scale,
    global scale or None)``."""
    amax_b = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax_b).all()):
        bad = (~torch.isfinite(amax_b)).nonzero()[:4].tolist()
        raise ValueError(f"weight has non-finite values (inf/nan) in block(s) {bad} "
                         "([row, block]); cannot quantize to FP4")
    if fmt == "nvfp4":
        g = amax_b.max().clamp_min(_AMAX_FLOOR) / (E2M1_MAX * FP8_E4M3_MAX)
        s = (amax_b / E2M1_MAX / g).clamp_(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return s.to(torch.float32) * g, s, g
    _, exp = torch.frexp(amax_b)  # amax = m * 2**exp, m in [0.5, 1): floor(log2 amax) = exp - 1
    e = torch.where(amax_b > 0, exp - 1 - _E2M1_EMAX, torch.full_like(exp, _E8M0_MIN_EXP))
    e = e.clamp_(_E8M0_MIN_EXP, _E8M0_MAX_EXP)
    stored = (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return torch.ldexp(torch.ones_like(amax_b), e), stored, None


def _scaled(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x / d`` per block, 0 where the block's decode scale is 0 (NVFP4 scale underflow)."""
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where((d > 0)[..., None], x / safe[..., None], torch.zeros_like(x))


def quantize_fp4(w: torch.Tensor, fmt: str = "nvfp4") -> Fp4Quantized:
    """``w`` [M, N] (bf16/fp16/fp32) -> :class:`Fp4Quantized` (module docstring for the
    formats).  Raises ValueError on non-finite weights."""
    block = _check_fmt(fmt)
    _check_weight(w)
    m, n = w.shape
    x = _blocked(w, block)
    d, stored, g = _decode_scales(x, fmt)
    q = round_to_e2m1(_scaled(x, d))
    return Fp4Quantized(fmt, _e2m1_codes(q).view(m, -1)[:, :n].contiguous(), stored, g)


def dequantize_fp4(qt: Fp4Quantized, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``e2m1(codes) * decode scale`` per block, cast to ``dtype`` [M, N]."""
    block = _check_fmt(qt.fmt)
    m, n = qt.codes.shape
    nb = -(-n // block)
    if tuple(qt.block_scale.shape) != (m, nb):
        raise ValueError(f"block_scale has shape {tuple(qt.block_scale.shape)}, expected "
                         f"{(m, nb)} for a {m}x{n} weight with blocks of {block}")
    if qt.fmt == "nvfp4":
        d = qt.block_scale.to(torch.float32) * qt.global_scale
    else:
        e = qt.block_scale.view(torch.uint8).to(torch.int32) - 127
        d = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)
    v = torch.zeros((m, nb * block), dtype=torch.float32, device=qt.codes.device)
    v[:, :n] = e2m1_decode(qt.codes)
    return (v.view(m, nb, block) * d[..., None]).view(m, -1)[:, :n].to(dtype)


def fake_quantize_fp4(w: torch.Tensor, fmt: str = "nvfp4") -> torch.Tensor:
    """Quantize then dequantize: ``w``'s dtype and shape, carrying exactly the 4-bit weight
    error (equal to ``dequantize_fp4(quantize_fp4(w, fmt), w.dtype)``)."""
    block = _check_fmt(fmt)
    _check_weight(w)
    m, n = w.shape
    x = _blocked(w, block)
    d, _, _ = _decode_scales(x, fmt)
    out = round_to_e2m1(_scaled(x, d)).mul_(d[..., None])
    return out.view(m, -1)[:, :n].to(w.dtype)


def emulate_fp4_named_tensors(named: Iterable[tuple[str, torch.Tensor]], fmt: str = "nvfp4",
                              ) -> Iterator[tuple[str, torch.Tensor]]:
    """FP4 emulation for rollouts: quantizable weights (the FP8 rule) are replaced by their
    quantize-then-dequantize value in their own dtype; every other tensor is yielded as is."""
    _check_fmt(fmt)
    yield from emulate_named_tensors(named, lambda t: fake_quantize_fp4(t, fmt))


def emulate_nvfp4_named_tensors(named: Iterable[tuple[str, torch.Tensor]]
                                ) -> Iterator[tuple[str, torch.Tensor]]:
    """``rollout.precision: nvfp4_emulated``."""
    return emulate_fp4_named_tensors(named, "nvfp4")


def emulate_mxfp4_named_tensors(named: Iterable[tuple[str, torch.Tensor]]
                                ) -> Iterator[tuple[str, torch.Tensor]]:
    """``rollout.precision: mxfp4_emulated``."""
    return emulate_fp4_named_tensors(named, "mxfp4")
