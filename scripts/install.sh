#!/usr/bin/env bash
# Install everything drpo-megatron and its test suite need (Python 3.11, CPU stack):
#
#   bash scripts/install.sh                 # everything below
#   bash scripts/install.sh --system-only   # step 1 only (e.g. to bake a CI image)
#
# 1. Debian packages listed in .ci/apt-packages.txt (headless Chromium for the dashboard browser
#    test; SLURM, munge and MariaDB for the local-cluster tests; python3.11-venv), when missing:
#    installed with apt-get as root.  Without root, or without apt-get, it prints the exact
#    command to run (and why) and stops before the Python part; DRPO_SKIP_SYSTEM_PACKAGES=1 skips
#    this step on purpose (then `drpo train` works, the browser and SLURM tests fail, naming them).
# 2. .venv/ with torch 2.13.0 CPU, SGLang 0.5.23 CPU subset, megatron-core 0.19.2, megatron-bridge
#    0.6.2, transformers 5.12.1, ...: everything is pinned in requirements/ and installed with
#    --no-deps: SGLang pins a CUDA torch, megatron-core/-bridge declare Python >= 3.12 and
#    CUDA-only extras, so pip's resolver cannot be used (see requirements/*.txt for the reasons
#    per file).  Nothing is fetched from a model hub.
#
# Then the README's test command, `.venv/bin/python -m pytest`, runs the whole default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") SYSTEM_ONLY=0 ;;
  --system-only) SYSTEM_ONLY=1 ;;
  *) echo "usage: bash scripts/install.sh [--system-only]" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------- 1. system packages
APT_LIST=.ci/apt-packages.txt
mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$APT_LIST" | grep -v '^$')
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
why="headless Chromium for tests/dashboard/test_browser.py; slurmctld/slurmd/slurm-client/munge/slurmdbd/mariadb-server for the local SLURM cluster of tests/operate/test_slurm_local.py; python3.11-venv for .venv (see $APT_LIST)"
if [ "${#missing[@]}" -eq 0 ]; then
  echo "[install] system packages: all present (${#PACKAGES[@]} in $APT_LIST)"
elif [ "${DRPO_SKIP_SYSTEM_PACKAGES:-0}" = "1" ]; then
  echo "[install] DRPO_SKIP_SYSTEM_PACKAGES=1: not installing ${missing[*]} (needed for: $why);" \
       "the tests that use them will fail, naming them" >&2
elif ! command -v apt-get >/dev/null; then
  echo "install.sh: missing system packages: ${missing[*]}" >&2
  echo "  needed for: $why" >&2
  echo "  this machine has no apt-get: install the equivalents with its package manager, then re-run" \
       "bash scripts/install.sh (or DRPO_SKIP_SYSTEM_PACKAGES=1 bash scripts/install.sh to skip them)" >&2
  exit 2
elif [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: missing system packages: ${missing[*]}" >&2
  echo "  needed for: $why" >&2
  echo "  installing them needs root; run:" >&2
  echo "    sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "  then re-run: bash scripts/install.sh   (or DRPO_SKIP_SYSTEM_PACKAGES=1 bash scripts/install.sh to skip them)" >&2
  exit 2
else
  log=$(mktemp /tmp/drpo-install-apt.XXXXXX.log)
  echo "[install] system packages (apt-get, log $log): ${missing[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "install.sh: apt-get failed installing ${missing[*]}; last lines of $log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  rm -f "$log"
fi

[ "$SYSTEM_ONLY" = "1" ] && exit 0

# ---------------------------------------------------------------------- 2. Python stack
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
# The import check goes through drpo's model module first: it silences megatron-bridge's
# optional-import notices (a traceback for FP8GlobalStateManager without Transformer Engine) and
# keeps Megatron's "Apex / Transformer Engine not installed" fallbacks warnings out of the log.
.venv/bin/python -W ignore::UserWarning - <<'PY'
import torch
from drpo_megatron.platform import apply_cpu_compat
apply_cpu_compat()
import drpo_megatron.models.megatron_model  # noqa: F401
import megatron.core, megatron.bridge, sglang, transformers, math_verify  # noqa: F401
print(f"[install] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {megatron.core.__version__}")
PY
