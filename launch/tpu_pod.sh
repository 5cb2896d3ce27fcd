#!/usr/bin/env bash
# Runs one config on every worker of a TPU pod slice (not exercised in this repository's CI).
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# Every worker installs the checked-out trustrl and runs trustrl.main; jax.distributed picks
# up the pod topology itself (GPU clusters: --coordinator_address / --num_processes /
# --process_id). A SIGTERM (maintenance event, preemption) checkpoints and exits 143; rerun to
# resume. NOT YET WORKING (issue 13): multi-process runs still read global arrays on the host,
# and WORKDIR must be a local path shared by every host (a gs:// bucket is not supported yet).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2; exit 2
fi
NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=$(git rev-parse --show-toplevel)
gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME":~/trustrl --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  cd ~/trustrl && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]' &&
  .venv/bin/python -m trustrl.main --config=$CONFIG --workdir=$WORKDIR --multihost $*"
