#!/usr/bin/env bash
# Reproduce the worked example of docs/mismatch.md: train a BF16 run and an FP8-emulated run,
# build one mismatch report overlaying both, and screenshot it with headless Chromium.
#
#   tools/mismatch_example.sh                 # from the repository root
#   BF16_CONFIG=... FP8_CONFIG=... STEPS=30 tools/mismatch_example.sh
#
# The two configs are identical except rollout.precision (bf16 vs fp8_emulated: the FP8 run
# pushes 128x128-blockwise e4m3 quantized-then-dequantized weights to SGLang at every sync).
set -euo pipefail

cd "$(dirname "$0")/.."

BF16_CONFIG="${BF16_CONFIG:-model_configs/tiny_qwen3_moe_cpu.yaml}"
FP8_CONFIG="${FP8_CONFIG:-model_configs/tiny_qwen3_moe_cpu_fp8_emulated.yaml}"
STEPS="${STEPS:-60}"                    # empty: the configs' train.max_steps
DRPO="${DRPO:-.venv/bin/drpo}"
REPORT="${REPORT:-docs/mismatch_report.html}"
SHOT="${SHOT:-docs/mismatch_dashboard.png}"
SHOT_SIZE="${SHOT_SIZE:-1500,4200}"     # width,height of the screenshot (top sections)

for cfg in "$BF16_CONFIG" "$FP8_CONFIG"; do
  if [[ ! -f "$cfg" ]]; then
    echo "missing config: $cfg (set BF16_CONFIG / FP8_CONFIG)" >&2
    exit 2
  fi
done

export OMP_NUM_THREADS=1
steps_arg=()
[[ -n "$STEPS" ]] && steps_arg=(--max-steps "$STEPS")

# 1. Two training runs; each writes config.yaml, metrics.jsonl, histograms.jsonl and tb/.
"$DRPO" train --config "$BF16_CONFIG" --output-dir runs/bf16 "${steps_arg[@]}"
"$DRPO" train --config "$FP8_CONFIG" --output-dir runs/fp8 "${steps_arg[@]}"

# 2. One self-contained report overlaying both runs.
"$DRPO" dashboard runs/bf16 runs/fp8 -o "$REPORT" --title "Mismatch: BF16 vs FP8 rollout"

# 3. Screenshot with headless Chromium (apt-get install -y chromium).
CHROMIUM="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$CHROMIUM" ]]; then
  echo "chromium not found: report written to $REPORT, no screenshot" >&2
  exit 0
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$CHROMIUM" --headless --no-sandbox --disable-gpu --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="$SHOT_SIZE" \
  --screenshot="$PWD/$SHOT" "file://$PWD/$REPORT" 2>/dev/null
echo "report: $REPORT  screenshot: $SHOT"
