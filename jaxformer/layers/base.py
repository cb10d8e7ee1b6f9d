"""Shared building blocks for parameters and activations.

Every parameter carries logical axis names (CATALOG J): 'embed', 'vocab', 'heads', 'kv_heads',
'head_dim', 'mlp', 'layers', 'expert', 'norm', 'position'. Layers never name mesh axes; the mapping
from logical names to mesh axes is installed by the caller with `logical_rules(...)` and only
then do the activation constraints in `constrain` do anything.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer

_RULES: list[tuple[tuple[str, str | tuple[str, ...] | None], ...]] = []


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names as metadata (no eager sharding)."""
  if len(shape) != len(names):
    raise ValueError(f'param shape {tuple(shape)} and axis names {tuple(names)} differ in rank')
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


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


@contextlib.contextmanager
def logical_rules(rules):
  """Installs logical-axis -> mesh-axis rules for `constrain` (and `nnx.logical_axis_rules`)."""
  rules = tuple((k, v) for k, v in rules)
  _RULES.append(rules)
  try:
    with nnx.logical_axis_rules(rules):
      yield rules
  finally:
    _RULES.pop()


def current_rules():
  return _RULES[-1] if _RULES else None


def logical_to_spec(names: Sequence[str | None], rules=None) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec; unknown names are replicated."""
  rules = dict(rules if rules is not None else (current_rules() or ()))
  used, spec = set(), []
  for n in names:
    axis = rules.get(n) if n is not None else None
    flat = axis if isinstance(axis, tuple) else (axis,)
    if axis is None or any(a in used for a in flat):
      spec.append(None)
    else:
      used.update(flat)
      spec.append(axis)
  return jax.sharding.PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op unless rules and a mesh are set."""
  rules = current_rules()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


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
