"""Model and optimizer state created directly in its final sharding (CATALOG J).

Nothing is materialised whole on one device: the model is first traced abstractly
(`nnx.eval_shape`), each variable's sharding is read from its logical names, and the
initialiser runs under `jax.jit` with those `out_shardings`, so XLA creates every shard on its
own device (random initialisers are partitionable: `jax_threefry_partitionable`, on by default,
gives the same numbers on any mesh). Optimizer state is laid out like the parameters it
mirrors (`optax.tree_map_params`); its counters are replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.parallel.sharding import Layout


def _build(cfg: ModelConfig, seed: int) -> nnx.Module:
  from jaxformer.models import build_model  # pylint: disable=import-outside-toplevel
  return build_model(cfg, seed=seed)


def abstract_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
  """The model with `jax.ShapeDtypeStruct` values: shapes, dtypes and metadata, no memory."""
  return nnx.eval_shape(lambda: _build(cfg, seed))


def init_model(cfg: ModelConfig, layout: Layout, *, seed: int = 0) -> nnx.Module:
  """Builds the model of `cfg` with every variable created in its sharding on `layout`.

  The parameters equal those of `build_model(cfg, seed=seed)` on one device.
  """
  graphdef, abstract = nnx.split(abstract_model(cfg, seed))
  shardings = layout.state_shardings(abstract)  # checks divisibility before compiling
  state = jax.jit(lambda: nnx.split(_build(cfg, seed))[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def expand(prefix, tree):
  """A prefix tree (e.g. one sharding per nnx.Variable) repeated down to every leaf of `tree`."""
  return jax.tree.map(lambda p, sub: jax.tree.map(lambda _: p, sub), prefix, tree)


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings,
                        layout: Layout) -> Any:
  """Shardings of `tx.init(params)`: moments like their parameters, the rest replicated.

  A state entry shaped like the parameter tree but not like its leaves (Adafactor's factored
  row/column statistics) is replicated: it is a vector per matrix, not a copy of it.
  """
  full = expand(param_shardings, params)
  abstract = jax.eval_shape(tx.init, params)

  def pick(value, sharding, param):
    return sharding if getattr(value, 'shape', None) == param.shape else layout.replicated

  return optax.tree_map_params(tx, pick, abstract, full, params,
                               transform_non_params=lambda _: layout.replicated)


def init_optimizer(tx: optax.GradientTransformation, params, param_shardings,
                   layout: Layout):
  """`tx.init(params)` created in place: (opt_state, its shardings)."""
  shardings = optimizer_shardings(tx, params, param_shardings, layout)
  return jax.jit(tx.init, out_shardings=shardings)(params), shardings


def abstract_with(tree, shardings) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` (arrays or abstract) carrying `shardings` (a prefix)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, expand(shardings, tree))


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` laid out by `shardings` (the largest over devices)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(expand(shardings, tree))):
    total += math.prod(s.shard_shape(x.shape)) * _itemsize(x.dtype)
  return total


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return data.dtype.itemsize * math.prod(data.shape)
  return jax.numpy.dtype(dtype).itemsize
