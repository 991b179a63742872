#!/usr/bin/env bash
# One-command GPU check of the online curvature measurement (<= 8 min on one H200):
#   bash benchmarks/gpu_check.sh                 # prints the tables, writes out/gpu_check.json
#   OUT=/tmp/gc.json bash benchmarks/gpu_check.sh --repeats 10
#   bash benchmarks/gpu_check.sh --cpu-smoke     # tiny sizes on CPU: checks the script runs (no figures)
# What it measures: see the docstring of benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
OUT="${OUT:-out/gpu_check.json}"
mkdir -p "$(dirname "$OUT")"
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" benchmarks/gpu_check.py --json "$OUT" "$@"
