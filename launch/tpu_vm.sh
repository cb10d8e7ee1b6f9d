#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or a pod slice): installs jaxformer with JAX for TPU on
# every worker, then starts the same command on all of them; JAX finds the other hosts itself.
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:arg] WORKDIR [overrides...]
# WORKDIR should be a gs:// bucket path (or a shared disk) that every host can write.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
repo=${JAXFORMER_REPO:-https://github.com/jaxformer/jaxformer.git}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  [ -d jaxformer ] || git clone $repo jaxformer
  cd jaxformer && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m jaxformer.train --multihost --config=$config --workdir=$workdir $*
"
