#!/usr/bin/env bash
# The main job on the shipped data. Installs what it needs (./.venv) first.
#
#   bash scripts/demo.sh
#
# Today: the Hessian spectrum (top-3 eigenvalues, Hutchinson trace, per-layer lambda_max) of the
# `tiny` megatron-core GPT on a real Shakespeare batch. The CPU baseline-comparison demo replaces it
# once `lrscale compare` lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
mkdir -p out
.venv/bin/lrscale spectrum --preset tiny --dtype float64 --top-k 3 --max-iter 40 --trace-samples 20 \
  --per-layer --json out/spectrum-tiny.json
echo "wrote out/spectrum-tiny.json"
