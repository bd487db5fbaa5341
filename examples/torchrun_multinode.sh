#!/usr/bin/env bash
# lit-accel on several GPU nodes, started by torchrun: run this same command on every node (docs/multinode.md).
# torchrun's c10d rendezvous on HEAD:PORT gathers the nodes and starts one process per GPU on each; Lightning reads
# the ranks and world size from torchrun's variables.
#
#   NNODES=2 GPUS_PER_NODE=8 HEAD=node001 bash examples/torchrun_multinode.sh
#   NNODES=2 HEAD=10.0.0.1 CONFIG=configs/llama-1b.yaml bash examples/torchrun_multinode.sh --trainer.max_steps 100
#
# Arguments after the script's name go to `lit-accel fit` as they are. HEAD is any one of the nodes, by a name or an
# address that every node reaches; PORT must be free there. Every node needs the same code, environment and config
# at the same paths, and a filesystem that all of them see for the checkpoints (runs/ in the configs).
set -euo pipefail

NNODES="${NNODES:?set NNODES to the number of nodes}"
HEAD="${HEAD:?set HEAD to the host name or address of one node (the rendezvous host)}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PORT="${PORT:-29500}"
RUN_ID="${RUN_ID:-lit-accel-multinode}"
CONFIG="${CONFIG:-configs/multinode-zero3.yaml}"

# NCCL picks its network itself; on clusters with several interfaces set what the cluster's documentation says, e.g.
#   export NCCL_SOCKET_IFNAME=ib0   # the interface for NCCL's bootstrap and socket traffic
#   export NCCL_IB_HCA=mlx5         # the InfiniBand adapters NCCL may use
#   export NCCL_DEBUG=INFO          # print the transports and rings NCCL chose (once, to check)

exec torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:$PORT" \
    --rdzv-id "$RUN_ID" \
    --no-python \
    lit-accel fit \
    --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    "$@"
