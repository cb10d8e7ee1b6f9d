"""Logical axis names -> device mesh (CATALOG J).

Layers only name logical axes ('embed', 'mlp', 'heads', ...). A config's
`parallel.logical_axis_rules` maps each to a mesh axis (or None); `shard_params` places a model's
parameters accordingly and `jaxformer.layers.base.logical_rules` turns on the activation
constraints inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxformer.layers.base import logical_to_spec


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> jax.sharding.Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  n = int(np.prod(shape))
  if n != devices.size:
    raise ValueError(f'mesh shape {tuple(shape)} needs {n} devices, found {devices.size}')
  return jax.sharding.Mesh(devices.reshape(tuple(shape)), tuple(names))


def param_specs(state: nnx.State, rules) -> nnx.State:
  """PartitionSpec for every variable from its logical names ('out_sharding' metadata)."""

  def spec(v):
    names = v.get_metadata().get('out_sharding') if isinstance(v, nnx.Variable) else None
    if names is None:
      return jax.sharding.PartitionSpec()
    return logical_to_spec(names, rules)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_params(model: nnx.Module, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
  """Places every variable of `model` on `mesh` according to `rules`, in place."""
  state = nnx.state(model)
  specs = param_specs(state, rules)
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  values = jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  placed = jax.device_put(values, shardings)
  nnx.update(model, placed)
  return model
