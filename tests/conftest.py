"""Test session setup: on a machine without CUDA apply the CPU compatibility layer once, as the
``drpo`` CLI does, so that in-process imports of transformers / Megatron work. (A no-op on CUDA.
Tests that show a fix is still needed run their check in a fresh subprocess without it.)"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from drpo_megatron.platform import apply_cpu_compat  # noqa: E402

apply_cpu_compat()
