#!/usr/bin/env bash
# Train on a GPU cluster with SLURM: one process per node, all local GPUs per process.
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh CONFIG[:arg] WORKDIR [overrides...]
# Install once per cluster: pip install -e . 'jax[cuda12]' (a shared venv in $JAXFORMER_VENV).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
. "${JAXFORMER_VENV:-.venv}/bin/activate"
# jax.distributed.initialize() reads SLURM's environment for the coordinator and process ids.
srun python -m jaxformer.train --multihost --config="$config" --workdir="$workdir" "$@"
