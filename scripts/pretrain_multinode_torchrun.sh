#!/usr/bin/env bash
# GPT pretraining on many nodes with torchrun's c10d rendezvous. Run this same command on EVERY node.
#
#   NNODES=4 MASTER_ADDR=node001 bash scripts/pretrain_multinode_torchrun.sh configs/gpt/gpt3-6.7b.json
#
# Exactly what runs on each node:
#   torchrun --nnodes $NNODES --nproc_per_node $GPUS_PER_NODE --rdzv-backend c10d \
#            --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $RDZV_ID -m lrscale_megatron.train CONFIG ARGS...
# The config's parallel.world_size must equal NNODES * GPUS_PER_NODE (checked at start).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: pretrain_multinode_torchrun.sh CONFIG [--override key=value ...]}
shift
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-lrscale-$(basename "$CONFIG" .json)}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  -m lrscale_megatron.train "$CONFIG" "$@"
