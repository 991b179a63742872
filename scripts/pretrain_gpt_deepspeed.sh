#!/usr/bin/env bash
# GPT pretraining with the DeepSpeed launcher, one node. Extra arguments go to the trainer.
#
#   bash scripts/pretrain_gpt_deepspeed.sh configs/gpt/gpt3-350m.json            # all GPUs of this node
#   NUM_GPUS=4 bash scripts/pretrain_gpt_deepspeed.sh configs/gpt/gpt3-125m.json --override parallel.world_size=4
#
# Exactly what runs:
#   deepspeed --num_gpus $NUM_GPUS --module lrscale_megatron.train CONFIG ARGS...
# (the launcher appends --local_rank=N, which the trainer ignores; it reads LOCAL_RANK/RANK/WORLD_SIZE).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: pretrain_gpt_deepspeed.sh CONFIG [--override key=value ...]}
shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec deepspeed --num_gpus "$NUM_GPUS" --module lrscale_megatron.train "$CONFIG" "$@"
