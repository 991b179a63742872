#!/usr/bin/env bash
# LRScale vs the baselines (cosine and inverse-sqrt at a copied LR, the Step Law formula, Schedule-Free AdamW,
# Prodigy, a tuned cosine LR grid) to a target validation loss: `lrscale compare`. Extra arguments go to it
# (e.g. --set output_dir=out/x, --force).
#
#   bash scripts/compare_baselines.sh configs/compare/cpu-demo.json        # the demo's step 2 (needs out/tune/cpu-demo/)
#   bash scripts/compare_baselines.sh configs/compare/cpu-bench.json       # the CPU benchmark (~25 min)
#   NPROC=4 bash scripts/compare_baselines.sh CONFIG --set 'overrides=["parallel.tp=2","parallel.pp=2"]'
#
# Exactly what runs:
#   python -m lrscale_megatron.compare.cli CONFIG ARGS...                                        (NPROC=1)
#   torchrun --standalone --nproc_per_node $NPROC -m lrscale_megatron.compare.cli CONFIG ARGS...  (NPROC>1)
# Many nodes: launch the same module under scripts/pretrain_multinode_torchrun.sh's torchrun line, with an
# output_dir every node sees. Finished runs are kept in <output_dir>/runs/ and skipped on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: compare_baselines.sh CONFIG [--set key=value ...] [--force]}
shift
PY=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-1}
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if [[ "$NPROC" == 1 ]]; then
  exec "$PY" -m lrscale_megatron.compare.cli "$CONFIG" "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m lrscale_megatron.compare.cli "$CONFIG" "$@"
