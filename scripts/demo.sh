#!/usr/bin/env bash
# The main job on the shipped data. Installs what it needs (./.venv) first.
#
#   bash scripts/demo.sh
#
# The CPU baseline comparison (`lrscale compare configs/compare/cpu-demo.json`): the cpu-tiny GPT
# (0.12M parameters, byte-level Shakespeare; KJV as the held-out corpus) trained with warmup+cosine and
# inverse-sqrt at the GPT-3 paper's LR, LRScale's law-predicted peak (offline and with online curvature
# adaptation) and a 4-point cosine LR grid, 2 seeds each. Prints the time-to-target table and writes
# out/compare/cpu-demo/report.md (+ report.json, loss/LR/lambda_max PNGs). A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
mkdir -p out
bash scripts/compare_baselines.sh configs/compare/cpu-demo.json "$@"
