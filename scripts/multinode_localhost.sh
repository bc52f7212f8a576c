#!/usr/bin/env bash
# Multi-node DDP without a cluster: two "nodes" of one process each on this machine (gloo), set up by
# hand the way a cluster would (MASTER_ADDR/PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK), with Lightning's
# num_nodes=2. The same variables on two real hosts (MASTER_ADDR = node 0's address) run it across machines.
#
#   scripts/multinode_localhost.sh RUN_DIR [train.py overrides ...]
#   scripts/multinode_localhost.sh logs/two_nodes +experiment=demo method.l_target=3.0
set -euo pipefail
RUN_DIR=$1; shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
PORT=${MASTER_PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
common=(trainer=ddp_sim trainer.devices=1 trainer.num_nodes=2 "hydra.run.dir=$RUN_DIR" "$@")
pids=()
for NODE in 0 1; do
  extra=()
  # Node 1 writes no Hydra files of its own into the shared run folder (as Lightning's own child ranks).
  [ "$NODE" = 1 ] && extra=(hydra.output_subdir=null hydra.job.name=train_node1)
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT WORLD_SIZE=2 NODE_RANK=$NODE LOCAL_RANK=0 \
    "$PY" "$HERE/train.py" "${common[@]}" "${extra[@]}" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
