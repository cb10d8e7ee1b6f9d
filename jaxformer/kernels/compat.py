"""The few Pallas names that moved between the JAX releases jaxformer supports.

JAX 0.10 (the CPU build CI installs) and 0.11 (the GPU machines) differ in where the
backend-specific compiler parameters live; everything else the kernels use (`pallas_call`,
`BlockSpec`, `ds`, `program_id`, `when`, `PrefetchScalarGridSpec`, `VMEM`) has one spelling in
both. Each lookup tries the current name first and falls back to the older one, and fails with a
message naming the JAX version when neither exists, rather than at an unrelated call site.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl  # noqa: F401  (re-exported for the kernels)


def _first(module, names: tuple[str, ...], what: str):
  for name in names:
    if hasattr(module, name):
      return getattr(module, name)
  raise ImportError(f'this JAX ({jax.__version__}) has none of {names} for {what}; the Pallas '
                    'kernels support JAX 0.10 and 0.11')


def gpu_compiler_params(**kwargs):
  """Triton compiler parameters (`num_warps`, `num_stages`)."""
  from jax.experimental.pallas import triton as plgpu
  return _first(plgpu, ('CompilerParams', 'TritonCompilerParams'), 'Triton compiler params')(
      **kwargs)


def tpu_compiler_params(**kwargs):
  """Mosaic TPU compiler parameters (`dimension_semantics`, `vmem_limit_bytes`)."""
  from jax.experimental.pallas import tpu as pltpu
  return _first(pltpu, ('CompilerParams', 'TPUCompilerParams'), 'Mosaic TPU compiler params')(
      **kwargs)


def tpu():
  """The `jax.experimental.pallas.tpu` module (VMEM, PrefetchScalarGridSpec)."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu
