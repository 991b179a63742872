#!/usr/bin/env bash
# GPT pretraining on megatron-core + DeepSpeed, one node. Extra arguments go to the trainer.
#
#   bash scripts/pretrain_gpt.sh configs/gpt/cpu-tiny.json                       # one process (CPU or 1 GPU)
#   NPROC=4 bash scripts/pretrain_gpt.sh configs/gpt/cpu-tiny.json --override parallel.tp=2 parallel.pp=2
#   NPROC=8 bash scripts/pretrain_gpt.sh configs/gpt/gpt3-125m.json             # one 8-GPU node (torchrun)
#   bash scripts/pretrain_gpt.sh configs/gpt/gpt3-1.3b.json --dry-run           # validate, no GPU needed
#
# Exactly what runs:
#   python -m lrscale_megatron.train CONFIG ARGS...                                        (NPROC=1)
#   torchrun --standalone --nproc_per_node $NPROC -m lrscale_megatron.train CONFIG ARGS...  (NPROC>1)
# Many nodes: scripts/pretrain_multinode_torchrun.sh, scripts/pretrain_multinode_deepspeed.sh,
# scripts/pretrain_gpt.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: pretrain_gpt.sh CONFIG [--dry-run] [--override key=value ...]}
shift
PY=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-1}
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if [[ "$NPROC" == 1 || " $* " == *" --dry-run "* ]]; then
  exec "$PY" -m lrscale_megatron.train "$CONFIG" "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m lrscale_megatron.train "$CONFIG" "$@"
