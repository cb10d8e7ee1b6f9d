"""Shared building blocks for parameters and activations.

Every parameter carries logical axis names (CATALOG J): 'embed', 'vocab', 'heads', 'kv_heads',
'head_dim', 'mlp', 'layers', 'expert', 'norm', 'position'. Layers never name mesh axes: the rules
that map logical names onto a mesh, and the activation constraints, live in `jaxformer.parallel`.

The optimizer reads its masks from the same metadata (jaxformer/train/optimizer.py). Where the
names alone cannot tell, a parameter says more: `role` ('bias' for a bias with two or more axes,
'embedding' for a part of the input embedding that is not a lookup table, 'weight' for a matrix
over positions that is not one), and `layer` / `layers_per_slice` (set by `tag_params`) place it
in the depth of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32, *, role: str | None = None) -> nnx.Param:
  """A parameter with logical axis names (and its `role`, if given) as metadata.

  No eager sharding: state is placed by `jaxformer.parallel` from the names.
  """
  if len(shape) != len(names):
    raise ValueError(f'param shape {tuple(shape)} and axis names {tuple(names)} differ in rank')
  metadata = {} if role is None else {'role': role}
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False, **metadata)


def tag_params(module: nnx.Module, **metadata) -> nnx.Module:
  """Adds `metadata` to every nnx.Param of `module` and returns it.

  For facts that belong to where a module sits rather than to the module itself: which layer a
  block is (`layer=i`; inside a scanned group of g blocks also `layers_per_slice=g`), or that a
  norm belongs to the input embedding (`role='embedding'`).
  """
  for _, value in nnx.iter_graph(module):
    if isinstance(value, nnx.Param):
      value.set_metadata(**metadata)
  return module


def normal_init(std: float) -> Initializer:
  return nnx.initializers.normal(stddev=std)


def make_init(kind: str, std: float, *, in_axis=-2, out_axis=-1) -> Initializer:
  """Weight initializer by name: normal(std) (GPT-2/BERT), xavier (original Transformer), lecun."""
  if kind == 'normal':
    return normal_init(std)
  if kind == 'xavier':
    return nnx.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
  if kind == 'lecun':
    return nnx.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)
  raise ValueError(f'unknown init {kind!r}; allowed: normal, xavier, lecun')


def residual_init(kind: str, std: float, num_layers: int, scaled: bool, **axes) -> Initializer:
  """Init for projections that write into the residual stream: std / sqrt(2L) when scaled."""
  if scaled and kind == 'normal':
    return normal_init(std / math.sqrt(2 * num_layers))
  return make_init(kind, std, **axes)


zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


def cast(x, dtype):
  return x if dtype is None else x.astype(dtype)


def check_token_ids(tokens: jax.Array, vocab_size: int, name: str = 'tokens') -> None:
  """Raises on ids outside [0, vocab_size) when the values are concrete (the input boundary).

  Under jit the values are abstract; the data pipeline and `Model.__call__` outside jit do the
  check, and `jaxformer.train` validates every batch on the host before it is sharded.
  """
  if isinstance(tokens, jax.core.Tracer):
    return
  t = jax.device_get(tokens)
  if t.size == 0:
    return
  lo, hi = int(t.min()), int(t.max())
  if lo < 0 or hi >= vocab_size:
    raise ValueError(
        f'{name} contain ids outside the vocabulary [0, {vocab_size}): min={lo}, max={hi}. '
        'Check the tokenizer and model.vocab_size.')
