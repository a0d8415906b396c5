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
