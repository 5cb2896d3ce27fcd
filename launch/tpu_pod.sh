#!/usr/bin/env bash
# Runs one config on every worker of a TPU pod slice (not exercised in this repository's CI).
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# Every worker installs the checked-out trustrl and runs trustrl.main; jax.distributed picks
# up the pod topology itself. WORKDIR should be a bucket (gs://...) so all hosts share it.
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
