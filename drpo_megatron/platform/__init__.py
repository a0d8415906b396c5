"""Platform compatibility layers (CPU only; no-ops on CUDA machines).

``apply_cpu_compat()`` applies the Megatron-Core / megatron-bridge CPU fixes
(:mod:`drpo_megatron.platform.megatron_cpu`); it does nothing when a CUDA device is present.
"""

from drpo_megatron.platform.megatron_cpu import (
    CPU_FIXES,
    apply_cpu_compat,
    cpu_transformer_overrides,
    is_cpu_only,
)

__all__ = ["CPU_FIXES", "apply_cpu_compat", "cpu_transformer_overrides", "is_cpu_only"]
