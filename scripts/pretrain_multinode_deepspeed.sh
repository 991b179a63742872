#!/usr/bin/env bash
# GPT pretraining on many nodes with the DeepSpeed launcher (pdsh/ssh from this node to all hosts).
#
#   HOSTFILE=hosts bash scripts/pretrain_multinode_deepspeed.sh configs/gpt/gpt3-13b.json
#
# where `hosts` lists one node per line with its GPU count (8 nodes for gpt3-13b):
#   node001 slots=8
#   node002 slots=8
#
# Exactly what runs (once, on the first node):
#   deepspeed --hostfile $HOSTFILE --num_nodes $NUM_NODES --num_gpus $GPUS_PER_NODE \
#             --master_addr $MASTER_ADDR --module lrscale_megatron.train CONFIG ARGS...
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: pretrain_multinode_deepspeed.sh CONFIG [--override key=value ...]}
shift
HOSTFILE=${HOSTFILE:-hosts}
NUM_NODES=${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --module lrscale_megatron.train "$CONFIG" "$@"
