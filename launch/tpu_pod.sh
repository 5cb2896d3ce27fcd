#!/usr/bin/env bash
# Runs one config on every worker of a TPU pod slice (not exercised in this repository's CI).
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# Every worker installs the checked-out trustrl and runs trustrl.main; jax.distributed picks
# up the pod topology itself (GPU clusters: --coordinator_address / --num_processes /
# --process_id). A SIGTERM (maintenance event, preemption) checkpoints and exits 143; rerun to
# resume. Multi-process runs are tested on CPU (2 processes x 4 devices on localhost equal
# 1 x 8, tests/infra/test_multiprocess.py), not on a pod. WORKDIR is a gs:// bucket path (or a
# filesystem every worker mounts): config, checkpoints, metrics, TensorBoard events, plots and
# the trained tokenizer go there (gcsfs, installed with the `gcs` extra); each worker builds the
# tfds dataset on its own disk (~/.cache/trustrl/workdirs/...). gs:// workdirs are tested
# against a local GCS emulator (tests/infra/test_storage.py), not a real bucket.
# Check first that the config fits the slice, from any machine (libtpu's compile-only devices):
#   pip install 'libtpu==0.0.42.1'
#   python -m trustrl.tools.aot_check --config=CONFIG --topology=v5p:2x4x4
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2; exit 2
fi
NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
# The jax / libtpu pair that trustrl.tools.aot_check's pod tables were compiled with (and CI's
# TPU compile check runs): docs/pod_memory.md. Change both together, then regenerate the tables.
JAX_VERSION=0.10.2
LIBTPU_VERSION=0.0.42.1
REPO=$(git rev-parse --show-toplevel)
gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME":~/trustrl --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  cd ~/trustrl && python3 -m venv .venv &&
  .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]==$JAX_VERSION' 'libtpu==$LIBTPU_VERSION' &&
  .venv/bin/python -m trustrl.main --config=$CONFIG --workdir=$WORKDIR --multihost $*"
