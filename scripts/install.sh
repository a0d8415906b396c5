#!/usr/bin/env bash
# Install drpo-megatron's CPU stack into .venv/ at the repository root (Python 3.11).
#
#   bash scripts/install.sh            # torch 2.13.0 CPU, SGLang 0.5.23 CPU subset, megatron-core
#                                      # 0.19.2, megatron-bridge 0.6.2, transformers 5.12.1, ...
#
# Everything is pinned in requirements/ and installed with --no-deps: SGLang pins a CUDA torch,
# megatron-core/-bridge declare Python >= 3.12 and CUDA-only extras, so pip's resolver cannot be
# used (see requirements/*.txt for the reasons per file).  Nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, got {sys.version}"' \
  || { echo "install.sh: Python 3.11 is required for the CPU stack (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
echo "[install] torch 2.13.0 (CPU build)"
"${PIP[@]}" -q torch==2.13.0
echo "[install] SGLang 0.5.23 CPU subset (no deps)"
"${PIP[@]}" -q --no-deps -r requirements/sglang-cpu.txt
echo "[install] megatron-core, megatron-bridge, transformers, math-verify, tensorboard, ... (no deps)"
"${PIP[@]}" -q --no-deps --ignore-requires-python -r requirements/stack-cpu.txt
echo "[install] drpo-megatron (editable)"
"${PIP[@]}" -q --no-deps -e .
.venv/bin/python - <<'PY'
import torch
from drpo_megatron.platform import apply_cpu_compat
apply_cpu_compat()
import megatron.core, megatron.bridge, sglang, transformers, math_verify  # noqa: F401
print(f"[install] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {megatron.core.__version__}")
PY
