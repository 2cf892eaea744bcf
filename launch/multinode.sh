#!/usr/bin/env bash
# Train on several machines without a scheduler: run this same command on every node,
# each with its own NODE_RANK. One `accelerate launch` per node starts one process per
# GPU; the nodes meet at MASTER_ADDR:MASTER_PORT (the NODE_RANK=0 machine).
#
#   node 0:  NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/gpt2-124m.yaml
#   node 1:  NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/gpt2-124m.yaml
#
#   launch/multinode.sh CONFIG [section.key=value ...]
#
# Prepare the data on several machines at once the same way, with STAGE=prepare: one
# process per machine, each tokenizing its share of the corpus's parts with all its
# cores; the NODE_RANK=0 machine writes the manifest once every part is in. The data
# directory must be on a filesystem all of them share.
#
#   node 0:  STAGE=prepare NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/gpt2-124m.yaml
#   node 1:  STAGE=prepare NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/gpt2-124m.yaml
#
# Environment (defaults in brackets):
#   NUM_NODES      machines taking part [1]
#   NODE_RANK      this machine's rank, 0 .. NUM_NODES-1 [0]
#   MASTER_ADDR    address of the rank-0 machine, reachable from all of them [127.0.0.1]
#   MASTER_PORT    a free TCP port on it [29500]
#   GPUS_PER_NODE  processes per machine [the GPUs this job may use: CUDA_VISIBLE_DEVICES when
#                  set (Slurm sets it), else all nvidia-smi lists; 1 on a CPU-only machine]
#   ACCEL_CONFIG   accelerate config [configs/accelerate/multi-node.yaml]
#   ACCELERATE     the accelerate command [.venv/bin/accelerate, else accelerate on PATH]
#   STAGE          train or prepare [train]
#
# The data must be prepared before (`make data CONFIG=...`): once on a shared filesystem,
# or on every node when each has its own disk. Only the main process writes the run
# directory, so runs/ should be shared for the checkpoints to be where a restart looks.
# On a machine without a GPU the processes train on the CPU over gloo
# (ACCELERATE_USE_CPU=1): that is how tests/test_launch.py runs two "machines" on
# 127.0.0.1. SIGTERM or Ctrl-C reaches the training processes through accelerate's
# launcher; they write a checkpoint and stop, and the same command resumes.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage $(( $# == 0 ? 2 : 0 ))
CONFIG=$1
shift

cd "$(dirname "$0")/.."

NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCEL_CONFIG=${ACCEL_CONFIG:-configs/accelerate/multi-node.yaml}
if [[ -z ${ACCELERATE:-} ]]; then
    if [[ -x .venv/bin/accelerate ]]; then ACCELERATE=.venv/bin/accelerate; else ACCELERATE=accelerate; fi
fi
if [[ -z ${PYTHON:-} ]]; then  # the interpreter that accelerate runs in
    PYTHON=$(dirname "$(command -v "$ACCELERATE")")/python
    [[ -x $PYTHON ]] || PYTHON=python3
fi

gpu_count() {  # the GPUs this job may use: CUDA_VISIBLE_DEVICES (Slurm's too) when set
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
    elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '^[^-]' || true
    else
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    fi
}
GPUS=$(gpu_count)
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}

fail() { echo "launch/multinode.sh: $*" >&2; exit 2; }
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || fail "NUM_NODES=$NUM_NODES must be a positive integer"
[[ $NODE_RANK =~ ^[0-9]+$ ]] && (( NODE_RANK < NUM_NODES )) \
    || fail "NODE_RANK=$NODE_RANK must be between 0 and NUM_NODES-1=$((NUM_NODES - 1))"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || fail "GPUS_PER_NODE=$GPUS_PER_NODE must be a positive integer"
[[ -f $CONFIG ]] || fail "config $CONFIG not found (the shipped ones are in configs/)"
STAGE=${STAGE:-train}
[[ $STAGE == train || $STAGE == prepare ]] || fail "STAGE=$STAGE must be train or prepare"

if [[ $STAGE == prepare ]]; then
    # One process per machine: prepare's own worker pool uses every core.
    echo "node $NODE_RANK of $NUM_NODES: prepare, main node $MASTER_ADDR:$MASTER_PORT" >&2
    export ACCELERATE_USE_CPU=1  # no GPU is used; keeps accelerate from asking for one
    exec "$ACCELERATE" launch \
        --config_file "$ACCEL_CONFIG" \
        --num_machines "$NUM_NODES" \
        --num_processes "$NUM_NODES" \
        --machine_rank "$NODE_RANK" \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend static \
        --same_network \
        -m pipeline.prepare --config "$CONFIG" "$@"
fi

# The prepared data must be there before any process starts reading it.
DATA_DIR=$("$PYTHON" -m pipeline.config --config "$CONFIG" "$@" --get data_dir)
[[ -f $DATA_DIR/manifest.json ]] || fail "no prepared data in $DATA_DIR; run \`make data CONFIG=$CONFIG\` \
first (once on a shared filesystem, else on every node)"

if (( GPUS == 0 )); then
    export ACCELERATE_USE_CPU=1  # a CPU-only machine: gloo between CPU processes
fi
echo "node $NODE_RANK of $NUM_NODES: $GPUS_PER_NODE process(es), main node $MASTER_ADDR:$MASTER_PORT" >&2

# exec: the launcher takes this shell's place, so a SIGTERM sent to this script's PID
# reaches it (and through it the training processes) directly.
exec "$ACCELERATE" launch \
    --config_file "$ACCEL_CONFIG" \
    --num_machines "$NUM_NODES" \
    --num_processes $(( NUM_NODES * GPUS_PER_NODE )) \
    --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    --rdzv_backend static \
    --same_network \
    -m pipeline.train --config "$CONFIG" "$@"
