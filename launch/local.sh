#!/usr/bin/env bash
# Train on this machine (CPU or local GPUs/TPU).
#   launch/local.sh configs/quickstart.py runs/quickstart [--config.train.steps=100 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:arg] WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG[:arg] WORKDIR [overrides...]}
shift 2
exec python -m jaxformer.train --config="$config" --workdir="$workdir" "$@"
