"""FP8 rollout weights: 128x128 blockwise e4m3 quantization with FP32 inverse scales (pure torch).

The FP8 rollout (the DRPO paper, arXiv:2606.09821, FP8 settings) trains in BF16 and serves the
policy in FP8: at every weight sync the linear weights are re-quantized into the layout of
SGLang's block-FP8 checkpoints (the layout of Qwen's published ``*-FP8`` and of DeepSeek-V3
checkpoints); the router, embeddings, ``lm_head`` and norms stay BF16.

Checkpoint layout (what SGLang's ``fp8`` quantization with ``weight_block_size`` loads)
---------------------------------------------------------------------------------------
For every quantized linear ``X`` with an HF weight ``X.weight`` of shape ``[out, in]``:

- ``X.weight``: ``torch.float8_e4m3fn``, ``[out, in]``;
- ``X.weight_scale_inv``: ``torch.float32``, ``[ceil(out/128), ceil(in/128)]``;

and ``dequantized[i, j] = float(X.weight[i, j]) * X.weight_scale_inv[i // 128, j // 128]``.
Checked against sglang (the version pinned in requirements/), without importing it here:

- ``sglang/srt/layers/quantization/fp8.py``, ``Fp8Config.from_config``: ``quant_method``
  containing ``"fp8"`` means an FP8-serialized checkpoint; ``weight_block_size`` (2 entries)
  requires ``activation_scheme == "dynamic"``; the list of BF16 modules is read from
  ``ignored_layers`` or ``modules_to_not_convert`` (matched on dotted-path boundaries by
  ``quantization/utils.py:_module_path_match`` / ``is_layer_skipped``).
- ``fp8.py``, ``Fp8LinearMethod.create_fp8_weight_``: block-quantized linears register
  ``weight`` as float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` as float32
  ``[ceil(out/bn), ceil(in/bk)]`` (ceil: partial edge blocks are scaled like full ones).
  ``Fp8MoEMethod.create_weights`` builds ``w13_weight_scale_inv`` / ``w2_weight_scale_inv`` per
  expert from the same per-projection shapes, and ``FusedMoE.make_expert_params_mapping`` maps
  ``experts.{e}.{gate,up,down}_proj.weight_scale_inv`` onto them, so experts use the same
  per-tensor layout.  ``Fp8LinearMethod.validate_block_quant_shapes``: under tensor
  parallelism every weight shard must be a multiple of 128 along the split dimension (true for
  all the models of the paper's FP8 settings).
- ``fp8_utils.py``, ``block_quant_dequant``: dequantization is ``fp8.to(float32) *
  scale_inv`` repeated over 128x128 tiles and cropped to the weight's shape -- the inverse
  scale multiplies, i.e. ``scale_inv = amax / 448``.
- ``models/qwen3_moe.py``: the MoE router ``mlp.gate`` is built without the quant config
  (always BF16); embeddings, ``lm_head`` and norms are not linear layers of the FP8 method.

Quantization (one 128x128 block ``B``, computed in fp32)::

    amax      = max(|B|)                      (exact: abs and max do not round)
    scale_inv = max(amax, 1e-12) / 448        (448 = largest finite e4m3fn)
    q         = e4m3(B / scale_inv)           (round to nearest even)

The 1e-12 floor (as SGLang's ``fp8_utils.input_to_float8`` uses) only keeps all-zero blocks
finite; DeepGEMM's ``per_block_cast_to_fp8`` floors amax at 1e-4, which would push blocks of
tiny weights into e4m3 subnormals.  ``|B / scale_inv| <= 448 * (1 + 2**-23)`` (two fp32
roundings), which rounds to 448, so no clamp is needed and the block maximum maps to +-448.
Edge blocks of shapes that are not multiples of 128 are scaled by the amax of their real
elements (zero padding never changes an amax).  Non-finite weights raise ``ValueError``.

Error of the round trip (what the tests check): with ``y = w / scale_inv``, e4m3 has 3
mantissa bits, so for normal ``|y| >= 2**-6`` rounding errs by at most half an ulp,
``2**-4 * 2**floor(log2|y|) <= 2**-4 |y|``; below that (subnormals, spacing ``2**-9``) by at
most ``2**-10``.  Hence ``|w - dequant(w)| <= max(2**-4 |w|, 2**-10 * scale_inv)`` up to fp32
rounding.

Implementation: vectorised over blocks (pad to block multiples, view as
``[rows/128, 128, cols/128, 128]``, amax over the block axes); on CPU the rows are processed
in chunks of whole block rows (~2 MiB of fp32 each) so the fp32 temporaries stay in cache and
the extra memory is bounded by one chunk instead of twice the weight; on CUDA one chunk is the
whole tensor.  e4m3 -> fp32 decoding on CPU goes through an exact bit remapping to fp16
(``_e4m3_to_f16_over_256``) because torch's scalar float8 conversion is ~20x slower.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "BLOCK",
    "FP8_QUANTIZED_PROJECTIONS",
    "quantize_blockwise",
    "dequantize_blockwise",
    "fake_quantize_blockwise",
    "is_fp8_quantizable",
    "quantize_named_tensors",
    "emulate_fp8_named_tensors",
    "fp8_quantization_config",
    "fp8_modules_to_not_convert",
    "quantization_error_stats",
]

FP8_E4M3_MAX = 448.0
BLOCK = (128, 128)
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "weight_scale_inv"

# Floor on a block's amax so that all-zero blocks get a finite, non-zero scale.
_AMAX_FLOOR = 1e-12
# CPU working-set target per chunk of block rows (fp32 bytes).
_CHUNK_BYTES = 2 << 20

# Leaf module names whose ``.weight`` is quantized (Qwen2/Qwen3/Qwen3-MoE/Llama naming).
FP8_QUANTIZED_PROJECTIONS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

# Generic BF16 modules for the config (SGLang matches them on dotted-path boundaries, so
# ``mlp.gate`` does not cover ``mlp.gate_proj``).  Only linear layers matter to SGLang; the
# embeddings are listed for readers of config.json.
DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head", "model.embed_tokens", "mlp.gate",
                                  "mlp.shared_expert_gate")


# ------------------------------------------------------------------------------ helpers
def _check_block(block: Sequence[int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) != b or b < 1 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"expected a bf16/fp16/fp32 weight, got {w.dtype}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_chunks(rows: int, padded_cols: int, bm: int, device: torch.device):
    """``(r0, r1)`` row ranges made of whole block rows (the last one may be partial)."""
    if device.type != "cpu":
        step = max(rows, 1)
    else:
        step = max(bm, (_CHUNK_BYTES // (4 * max(padded_cols, 1) * bm)) * bm)
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _padded_f32(chunk: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """A fresh fp32 copy of ``chunk`` zero-padded to block multiples (safe to modify)."""
    r, n = chunk.shape
    rp, np_ = _cdiv(r, bm) * bm, _cdiv(n, bn) * bn
    if rp == r and np_ == n:
        return chunk.to(torch.float32, copy=True)
    x = torch.zeros((rp, np_), dtype=torch.float32, device=chunk.device)
    x[:r, :n].copy_(chunk)
    return x


def _block_scale_inv(xv: torch.Tensor) -> torch.Tensor:
    """``[k, bm, nb, bn]`` fp32 view -> ``[k, nb]`` inverse scales ``max(amax, floor) / 448``."""
    # amax over the block's rows first, then its columns: ~2x faster on CPU than one
    # reduction over dims (1, 3), and exact either way (max does not round).
    amax = xv.abs().amax(dim=1).amax(dim=-1)
    return amax.clamp_min_(_AMAX_FLOOR).div_(FP8_E4M3_MAX)


def _scaled_chunks(w: torch.Tensor, bm: int, bn: int):
    """Yield ``(r0, r1, y, scale_inv)``: ``y`` = padded fp32 rows ``r0:r1`` divided by their
    block's inverse scale (``|y| <= 448``), ``scale_inv`` the ``[k, nb]`` rows of the scales."""
    m, n = w.shape
    nb = _cdiv(n, bn)
    for r0, r1 in _row_chunks(m, nb * bn, bm, w.device):
        x = _padded_f32(w[r0:r1], bm, bn)
        xv = x.view(x.shape[0] // bm, bm, nb, bn)
        s = _block_scale_inv(xv)
        xv.div_(s[:, None, :, None])
        yield r0, r1, x, s


def _e4m3_to_f16_over_256(q: torch.Tensor) -> torch.Tensor:
    """Exact e4m3fn -> fp16 decoding of ``q / 256`` by bit remapping (no NaN support).

    e4m3fn byte ``s eeee mmm`` (bias 7) placed as fp16 ``s 0eeee mmm0000000`` (bias 15) is the
    same number times ``2**-8``, subnormals included (the e4m3 subnormal ``m * 2**-9`` becomes
    the fp16 subnormal ``(m << 7) * 2**-24 = m * 2**-17``).  Sign-extending the byte to int16
    and multiplying by 128 puts the bits in place but copies the sign into bit 14, which the
    mask clears.  The NaN bytes 0x7F/0xFF would decode to +-480/256; callers handle them.
    Returns fp16 on CPU; elsewhere torch's native cast (fast there) to fp32, divided by 256.
    """
    if q.device.type != "cpu":  # native conversion is fast on accelerators
        return q.to(torch.float32).div_(256.0)
    return (q.view(torch.int8).to(torch.int16).mul_(128).bitwise_and_(-16385)
            .view(torch.float16))


def _dequantize_rows(q: torch.Tensor, s_rows: torch.Tensor, bn: int) -> torch.Tensor:
    """fp32 ``q * scale_inv`` for rows of ``q`` [r, n] with per-row block scales [r, nb]."""
    r, n = q.shape
    nb = s_rows.shape[1]
    h = _e4m3_to_f16_over_256(q)
    if nb * bn == n:
        x = h.to(torch.float32)
    else:
        x = torch.zeros((r, nb * bn), dtype=torch.float32, device=q.device)
        x[:, :n].copy_(h)
    # (q/256) * (256 * s) == q * s exactly: scaling by a power of two does not round, and
    # 256 * s cannot overflow (s <= fp32 max / 448).
    x.view(r, nb, bn).mul_((s_rows * 256.0)[:, :, None])
    # e4m3fn NaN bytes (never produced by quantize_blockwise).  In-place ``eq_`` keeps uint8:
    # a bool-producing comparison is ~10x slower on CPU here.
    nan = q.view(torch.uint8).bitwise_and(0x7F).eq_(0x7F)
    if bool(nan.any()):
        x[:, :n].masked_fill_(nan.bool(), float("nan"))
    return x[:, :n]


def _raise_nonfinite(scale_inv: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale_inv).all()):
        bad = (~torch.isfinite(scale_inv)).nonzero()[:4].tolist()
        raise ValueError(f"weight has non-finite values (inf/nan) in block(s) {bad} "
                         f"(block indices [row_block, col_block]); cannot quantize to FP8")


# ---------------------------------------------------------------------------------- API
def quantize_blockwise(w: torch.Tensor, block: Sequence[int] = BLOCK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [M, N] (bf16/fp16/fp32) -> ``(q, scale_inv)``: float8_e4m3fn [M, N] and fp32
    [ceil(M/bm), ceil(N/bn)] with ``w ~= q.float() * scale_inv`` per block (module docstring)."""
    _check_weight(w)
    bm, bn = _check_block(block)
    m, n = w.shape
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=w.device)
    scale_inv = torch.empty((_cdiv(m, bm), _cdiv(n, bn)), dtype=torch.float32, device=w.device)
    for r0, r1, y, s in _scaled_chunks(w, bm, bn):
        scale_inv[r0 // bm: r0 // bm + s.shape[0]] = s
        q[r0:r1].copy_(y[: r1 - r0, :n])  # fp32 -> e4m3fn, round to nearest even
    _raise_nonfinite(scale_inv)
    return q, scale_inv


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor,
                         block: Sequence[int] = BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q.float() * scale_inv`` broadcast over ``block`` tiles, cast to ``dtype`` [M, N]."""
    bm, bn = _check_block(block)
    if q.dim() != 2 or q.dtype != FP8_DTYPE:
        raise ValueError(f"expected a 2-D float8_e4m3fn tensor, got {q.dtype} "
                         f"{tuple(q.shape)}")
    m, n = q.shape
    want = (_cdiv(m, bm), _cdiv(n, bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for "
                         f"a {m}x{n} weight with {bm}x{bn} blocks")
    s = scale_inv.to(device=q.device, dtype=torch.float32)
    out = torch.empty((m, n), dtype=dtype, device=q.device)
    for r0, r1 in _row_chunks(m, want[1] * bn, bm, q.device):
        rows = torch.arange(r0, r1, device=q.device) // bm
        out[r0:r1].copy_(_dequantize_rows(q[r0:r1], s[rows], bn))
    return out


def fake_quantize_blockwise(w: torch.Tensor, block: Sequence[int] = BLOCK) -> torch.Tensor:
    """Quantize then dequantize: ``w``'s dtype and shape, carrying exactly the FP8 weight error
    (bitwise equal to ``dequantize_blockwise(*quantize_blockwise(w, block), block, w.dtype)``)."""
    _check_weight(w)
    bm, bn = _check_block(block)
    m, n = w.shape
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    for r0, r1, y, s in _scaled_chunks(w, bm, bn):
        _raise_nonfinite(s)
        r = r1 - r0
        q = y[:r, :n].to(FP8_DTYPE)
        rows = torch.arange(r, device=w.device) // bm
        out[r0:r1].copy_(_dequantize_rows(q, s[rows], bn))
    return out


def is_fp8_quantizable(hf_name: str, tensor: torch.Tensor) -> bool:
    """Whether an HF-named tensor is stored as FP8 in the rollout checkpoint.

    Rule: the name ends in ``<proj>.weight`` with ``<proj>`` one of ``q_proj k_proj v_proj
    o_proj`` (attention) or ``gate_proj up_proj down_proj`` (dense MLP, MoE experts
    ``mlp.experts.N.*``, shared experts), and the tensor is a 2-D floating-point matrix.
    Everything else stays BF16: the MoE router ``mlp.gate.weight`` (and
    ``mlp.shared_expert_gate``), ``embed_tokens``, ``lm_head``, every norm, biases, any 1-D
    tensor, and linear layers of other architectures (e.g. linear-attention ``in_proj_*``),
    which then must appear in ``modules_to_not_convert`` (see ``fp8_modules_to_not_convert``).
    """
    parts = hf_name.split(".")
    return (len(parts) >= 2 and parts[-1] == "weight"
            and parts[-2] in FP8_QUANTIZED_PROJECTIONS
            and tensor.dim() == 2 and tensor.is_floating_point()
            and tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2))


def quantize_named_tensors(named: Iterable[tuple[str, torch.Tensor]],
                           block: Sequence[int] = BLOCK,
                           passthrough_dtype: torch.dtype | None = torch.bfloat16,
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF-named tensors into the FP8 checkpoint layout.

    Quantizable weights ``X.weight`` yield ``("X.weight", fp8)`` then
    ``("X.weight_scale_inv", fp32)``; other floating-point tensors are passed through cast to
    ``passthrough_dtype`` (None: unchanged), non-floating tensors unchanged.
    """
    for name, t in named:
        if is_fp8_quantizable(name, t):
            try:
                q, s = quantize_blockwise(t, block)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            yield name, q
            yield name[: -len("weight")] + SCALE_SUFFIX, s
        elif passthrough_dtype is not None and t.is_floating_point():
            yield name, t.to(passthrough_dtype)
        else:
            yield name, t


def emulate_fp8_named_tensors(named: Iterable[tuple[str, torch.Tensor]],
                              block: Sequence[int] = BLOCK,
                              ) -> Iterator[tuple[str, torch.Tensor]]:
    """FP8 emulation for rollouts that cannot run FP8 kernels (CPU without AMX): quantizable
    weights are replaced by their quantize-then-dequantize value in their own dtype (the
    rollout carries the FP8 weight error), every other tensor is yielded as is (same object)."""
    yield from emulate_named_tensors(named, lambda t: fake_quantize_blockwise(t, block))


def emulate_named_tensors(named: Iterable[tuple[str, torch.Tensor]],
                          fake_quantize: Callable[[torch.Tensor], torch.Tensor],
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """``fake_quantize`` applied to the quantizable weights (:func:`is_fp8_quantizable`: the
    rule every emulated low-precision rollout shares), every other tensor yielded as is; a
    weight that cannot be quantized raises naming it."""
    for name, t in named:
        if is_fp8_quantizable(name, t):
            try:
                yield name, fake_quantize(t)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        else:
            yield name, t


def fp8_modules_to_not_convert(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Module paths of the 2-D ``*.weight`` tensors that stay BF16 (router, embeddings,
    lm_head, other linears), in first-seen order -- the explicit per-module list that Qwen's
    FP8 checkpoints put in ``modules_to_not_convert``."""
    out: dict[str, None] = {}
    for name, t in named:
        if name.endswith(".weight") and t.dim() >= 2 and not is_fp8_quantizable(name, t):
            out.setdefault(name[: -len(".weight")], None)
    return list(out)


def fp8_quantization_config(modules_to_not_convert: list[str] | None = None,
                            block: Sequence[int] = BLOCK) -> dict:
    """``quantization_config`` for config.json of the FP8 rollout checkpoint.

    ``modules_to_not_convert``: BF16 modules; default the generic
    ``DEFAULT_MODULES_TO_NOT_CONVERT`` (fine for Qwen3 dense/MoE, whose router SGLang never
    quantizes); pass ``fp8_modules_to_not_convert(named)`` for an exact per-module list.
    """
    bm, bn = _check_block(block)
    mods = list(DEFAULT_MODULES_TO_NOT_CONVERT if modules_to_not_convert is None
                else modules_to_not_convert)
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [bm, bn],
        "modules_to_not_convert": mods,
    }


def quantization_error_stats(w: torch.Tensor, wq: torch.Tensor) -> dict[str, float]:
    """Error of ``wq`` (e.g. ``fake_quantize_blockwise(w)``) against ``w``, in fp32:
    ``max_abs_err``, ``rel_fro_err`` = ||w - wq||_F / ||w||_F (0 when both are 0),
    ``max_abs`` = max |w|."""
    if w.shape != wq.shape:
        raise ValueError(f"shape mismatch {tuple(w.shape)} vs {tuple(wq.shape)}")
    wf = w.detach().to(torch.float32)
    d = wq.detach().to(device=w.device, dtype=torch.float32) - wf
    if d.numel() == 0:
        return {"max_abs_err": 0.0, "rel_fro_err": 0.0, "max_abs": 0.0}
    err = float(torch.linalg.vector_norm(d))
    ref = float(torch.linalg.vector_norm(wf))
    rel = err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
    return {"max_abs_err": float(d.abs().max()), "rel_fro_err": rel,
            "max_abs": float(wf.abs().max())}
