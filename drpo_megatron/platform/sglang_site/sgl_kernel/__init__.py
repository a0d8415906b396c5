"""CPU stand-in for ``sgl_kernel`` (SGLang's CUDA/AMX kernel wheel), used only by SGLang servers
that drpo-megatron launches on a machine without CUDA.

SGLang 0.5.23 imports ``sgl_kernel`` at module level in several places even when it will run the
``torch_native`` attention and ``pytorch`` sampling backends.  The real wheel does not install on
CPU-only machines without AMX.  Every attribute of this module is a callable that raises, so an
accidental use is loud, never silent.  ``tests/platform/test_sglang_cpu.py`` proves the server
still needs this module (import fails without it) and that no kernel was called during a run.
"""

from __future__ import annotations

__version__ = "0.0.0+drpo-cpu-stub"
STUB = True


class _KernelUnavailable:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{self._name} was called, but this is drpo-megatron's CPU stand-in for "
            "sgl_kernel: the real CUDA/AMX kernel is not available on this machine. Use SGLang flags "
            "that avoid it (--attention-backend torch_native --sampling-backend pytorch)."
        )

    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _KernelUnavailable(f"{self._name}.{item}")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _KernelUnavailable(name)


# ---------------------------------------------------------------------------------------------
# The one real kernel: SGLang's seeded sampling (``multinomial_with_seed``, used when a request
# carries ``sampling_seed``) hashes (seed, position, token id) with MurmurHash3 and, on a CPU
# tensor, calls ``torch.ops.sgl_kernel.murmur_hash32_cpu`` from the real wheel.  This is our own
# torch implementation of the same function (MurmurHash3 x86_32 over four 4-byte blocks: seed low
# word, seed high word, position, column; length 16; see SGLang's Triton kernel
# ``sglang/kernels/ops/sampling/murmur_hash.py`` for the definition it must match).
# tests/rollout/test_sglang_cpu_fixes.py checks it bit for bit against a scalar reference.
import torch as _torch

_MASK32 = 0xFFFFFFFF


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix(h, k):
    k = (k * 0xCC9E2D51) & _MASK32  # int64 products wrap mod 2**64: the low 32 bits are exact
    k = (_rotl32(k, 15) * 0x1B873593) & _MASK32
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def murmur_hash32_reference(seed: _torch.Tensor, positions: _torch.Tensor,
                            col_indices: _torch.Tensor) -> _torch.Tensor:
    """[n] seeds (int64, read as uint64), [n] positions, [m] column ids -> [n, m] uint32."""
    s = seed.to(_torch.int64)
    h = _mix(_torch.zeros_like(s), s & _MASK32)
    h = _mix(h, (s >> 32) & _MASK32)
    h = _mix(h, positions.to(_torch.int64) & _MASK32)                    # [n]
    cols = col_indices.to(_torch.int64) & _MASK32                         # [m]
    h = _mix(h[:, None], cols[None, :])                                   # [n, m]
    return _fmix32(h ^ 16).to(_torch.uint32)


def _murmur_fake(seed, positions, col_indices):
    return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=_torch.uint32)


def _register() -> None:
    try:  # a re-import of this module in the same process (tests) must not define it twice
        _ = _torch.ops.sgl_kernel.murmur_hash32_cpu  # raises when not registered yet
        return
    except (AttributeError, RuntimeError):
        pass
    lib = _torch.library.Library("sgl_kernel", "FRAGMENT")
    lib.define("murmur_hash32_cpu(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor")
    lib.impl("murmur_hash32_cpu", murmur_hash32_reference, "CPU")
    _torch.library.register_fake("sgl_kernel::murmur_hash32_cpu", _murmur_fake, lib=lib)
    globals()["_LIB"] = lib  # the registration lives as long as the Library object


_register()
