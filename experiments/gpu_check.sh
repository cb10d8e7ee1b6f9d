#!/usr/bin/env bash
# The prepared check for a lent NVIDIA GPU (docs/benchmarks.md, "GPU figures"): one command, run
# from the repository root on the GPU machine, writing what it measures under ${OUT:-runs/gpu}.
#   1. the Pallas flash-attention tests with the GPU (Triton) schedule compiled for real;
#   2. experiments/flash_benchmark.py (pallas vs cuDNN vs XLA, bf16), causal and bidirectional.
# Uses the machine's own python3 and JAX (no install: GPU machines here reach no registry).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
probe='import jaxformer, jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
if ! python3 -c "$probe"; then  # the CPU-only XLA flag jaxformer sets may be unknown to this jaxlib
  echo "jaxformer's XLA flag guard failed on this jaxlib: rerunning with JAXFORMER_ALLOW_YNN_FUSION=1"
  export JAXFORMER_ALLOW_YNN_FUSION=1
  python3 -c "$probe" || exit 1
fi
timeout "${KERNEL_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_flash_attention.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
for causal in true false; do
  timeout "${BENCH_S:-170}" python3 experiments/flash_benchmark.py --causal "$causal" \
    --repeats "${REPEATS:-5}" --out "$OUT/flash_causal_$causal.csv" 2>&1 \
    | tee "$OUT/flash_causal_$causal.log" | grep -v '^  ' | tail -45
done
