#!/usr/bin/env bash
# The main job on the shipped data. Installs what it needs (./.venv) first.
#
#   bash scripts/demo.sh                       # tune on proxies, then compare on the target (<= 10 min, 2 cores)
#   bash scripts/demo.sh --force               # extra arguments go to `lrscale compare`
#
# 1. `lrscale tune configs/tune/cpu-demo.json --out out/tune/cpu-demo`: derives a ladder of small proxies
#    from the target (configs/gpt/cpu-target.json), sweeps their LRs, fits the power law and predicts the
#    target's peak LR (out/tune/cpu-demo/law.json, prediction.json).
# 2. `lrscale compare configs/compare/cpu-demo.json`: trains the target, 2 seeds, with the copied GPT-3
#    Small LR (cosine, inverse-sqrt), the law's peak (LRScale offline and online), the published Step Law
#    formula, Schedule-Free AdamW and Prodigy at their authors' settings, and a 5-point cosine LR grid.
#    Prints the time-to-target table and the done-when checks; writes out/compare/cpu-demo/report.md
#    (+ report.json, loss / LR / lambda_max PNGs). Finished runs of either step are kept and skipped on a
#    rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
mkdir -p out
t0=$(date +%s)
.venv/bin/python -m lrscale_megatron.cli tune configs/tune/cpu-demo.json --out out/tune/cpu-demo
t1=$(date +%s)
bash scripts/compare_baselines.sh configs/compare/cpu-demo.json "$@"
t2=$(date +%s)
echo "demo: tune $((t1 - t0)) s, compare $((t2 - t1)) s, total $((t2 - t0)) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
