"""A layout (mesh + rules) and everything that places arrays by their logical names (CATALOG J).

`Layout(mesh, rules)` answers "where does this array live": `spec(names)` / `sharding(names)`
for one array, `state_shardings(state)` for an NNX state (from each Variable's 'out_sharding'
metadata), `batch_sharding()` for input batches.

Activation constraints: models call `constrain(x, names)` at the key activations. It reads the
layout that is *active while the function is traced*: `layout.wrap(fn)` returns a function that
activates the layout inside itself, so the layout belongs to the function object that `jax.jit`
caches, not to a global stack the jit cache cannot see (a function traced once under one layout
and called later under another would otherwise keep the first one). Outside an active layout
`constrain` does nothing, so the same model runs unsharded.

Custom kernels: XLA cannot partition a Pallas or cuDNN call, so `shard_kernel` runs one inside
`jax.shard_map` over the batch and head axes of the active layout (attention is independent
across both), with the same outputs as one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.parallel import rules as R
from jaxformer.parallel.pipeline import PipelineSpec
from jaxformer.parallel.rules import Rules

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar('jaxformer_layout',
                                                                        default=None)


def names_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a Variable carries (None when it has none)."""
  names = variable.get_metadata().get('out_sharding')
  return None if names is None else tuple(names)


def path_str(path) -> str:
  """'a/0/b' for a jax key path; the trailing `.value` of NNX variables is dropped."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  if len(parts) > 1 and parts[-1] == 'value':
    parts.pop()
  return '/'.join(parts)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """A device mesh plus the logical-axis rules that map array dimensions onto it, and the
  pipeline schedule when the layers run as a pipeline (jaxformer/parallel/pipeline.py)."""
  mesh: jax.sharding.Mesh
  rules: Rules
  pipeline: PipelineSpec | None = None

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  # ---------------------------------------------------------------- one array
  def spec(self, names: Sequence[str | None], what: str = 'an array') -> P:
    return self.rules.spec(names, what=what, sizes=self.sizes)

  def sharding(self, names: Sequence[str | None], what: str = 'an array') -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, what))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def shards(self, spec: P) -> tuple[int, ...]:
    """How many pieces each dimension of an array with `spec` is cut into."""
    out = []
    for entry in spec:
      axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
      out.append(math.prod(self.sizes[a] for a in axes))
    return tuple(out)

  def check_divisible(self, shape: Sequence[int], names: Sequence[str | None], spec: P,
                      what: str) -> None:
    """Refuses a dimension that its mesh axes do not divide, naming axis, size and dimension."""
    for dim, (size, name, entry) in enumerate(zip(shape, names, spec)):
      if entry is None:
        continue
      axes = (entry,) if isinstance(entry, str) else entry
      n = math.prod(self.sizes[a] for a in axes)
      if size % n:
        axis_text = ' x '.join(f'{a}={self.sizes[a]}' for a in axes)
        raise ConfigError(
            f'parallel.mesh: mesh axis {axis_text} cannot divide dimension {dim} ({name!r}, '
            f'size {size}) of {what} {tuple(shape)}; choose mesh sizes that divide it, or map '
            f'{name!r} elsewhere (parallel.rules.{name}=none replicates it)')

  def check_activations(self, sizes: Mapping[str, int]) -> None:
    """Refuses activation rules whose mesh axes do not divide the dimension they shard.

    `sizes` maps activation names to the model's sizes (heads, kv heads, FFN width, ...).
    """
    for name, size in sizes.items():
      spec = self.spec((name,))
      if spec[0] is None:
        continue
      axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
      n = math.prod(self.sizes[a] for a in axes)
      if size % n:
        axis_text = ' x '.join(f'{a}={self.sizes[a]}' for a in axes)
        param = name.removeprefix('activation_')
        raise ConfigError(
            f'parallel.mesh: mesh axis {axis_text} cannot divide the {param} dimension of the '
            f'activations (size {size}, logical name {name!r}); choose mesh sizes that divide '
            f'it, or replicate it (parallel.rules.{name}=none, with '
            f'parallel.rules.{param}=none for the weights)')

  # ---------------------------------------------------------------- model state
  def variable_sharding(self, variable: nnx.Variable, what: str) -> NamedSharding:
    names = names_of(variable)
    if names is None:
      return self.replicated
    shape = variable.get_value().shape
    if len(names) != len(shape):
      raise AssertionError(f'{what}: axis names {names} do not match the shape {shape}')
    spec = self.spec(names, what)
    self.check_divisible(shape, names, spec, what)
    return NamedSharding(self.mesh, spec)

  def state_shardings(self, state) -> Any:
    """A sharding for every Variable of an NNX state (a pytree prefix of the state).

    Variables with logical names are laid out by the rules (after checking that every sharded
    dimension divides); the others (RNG keys and counts) are replicated.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (self.variable_sharding(v, f'parameter {path_str(path)!r}')
                         if is_var(v) else self.replicated), state, is_leaf=is_var)

  # ---------------------------------------------------------------- batches
  @property
  def batch_axes(self) -> tuple[str, ...]:
    return tuple(a for a in self.rules.axes(R.BATCH) if self.sizes[a] > 1)

  @property
  def batch_shards(self) -> int:
    return math.prod(self.sizes[a] for a in self.batch_axes)

  def batch_sharding(self) -> NamedSharding:
    """Input arrays [B, ...]: the batch over the batch axes, the rest whole."""
    axes = self.batch_axes
    return NamedSharding(self.mesh, P(axes if len(axes) != 1 else axes[0]) if axes else P())

  # ---------------------------------------------------------------- activation constraints
  @contextlib.contextmanager
  def active(self):
    """Makes `constrain` (and `shard_kernel`) use this layout while the block runs."""
    token = _ACTIVE.set(self)
    try:
      yield self
    finally:
      _ACTIVE.reset(token)

  def wrap(self, fn: Callable) -> Callable:
    """`fn` with this layout active whenever it runs (and so whenever jit traces it)."""

    @functools.wraps(fn)
    def with_layout(*args, **kwargs):
      with self.active():
        return fn(*args, **kwargs)

    return with_layout


def active_layout() -> Layout | None:
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op unless a layout is active."""
  layout = _ACTIVE.get()
  if layout is None or layout.mesh.devices.size == 1:
    return x
  if x.ndim != len(names):
    raise AssertionError(f'constrain: names {tuple(names)} for an array of shape {x.shape}')
  return jax.lax.with_sharding_constraint(x, layout.sharding(names))


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def embedding_lookup(table: jax.Array, ids: jax.Array,
                     names: Sequence[str] = ('vocab', 'embed')) -> jax.Array:
  """`table[ids]` [..., D], with NaN rows for ids outside [0, V) (never a clipped lookup).

  Under an active layout that shards the vocabulary, this is Megatron's vocab-parallel
  embedding, written with `shard_map` because XLA cannot partition a gather from a table split
  along the gathered axis (it would replicate the whole table): each device looks up the ids
  that fall into its slice of the vocabulary, zeros the others, and a `psum` over the vocabulary
  axes adds the slices. A model dimension split for FSDP is gathered first, as for any weight.
  """
  v = table.shape[0]
  bad = (ids < 0) | (ids >= v)
  layout = _ACTIVE.get()
  spec = None if layout is None or layout.mesh.devices.size == 1 else layout.spec(names)
  batch = () if spec is None or ids.shape[0] % layout.batch_shards else layout.batch_axes
  if spec is None or not _axes(spec[0]) or set(_axes(spec[0])) & set(batch):
    safe = jnp.where(ids < 0, v, ids)
    return jnp.take(table, safe, axis=0, mode='fill', fill_value=jnp.nan)
  vocab, embed = _axes(spec[0]), _axes(spec[1])
  ids_spec = P(batch if len(batch) != 1 else batch[0], *([None] * (ids.ndim - 1)))
  out_spec = P(*ids_spec, None)

  def local(table, ids):
    if embed:
      table = jax.lax.all_gather(table, embed, axis=1, tiled=True)
    n = table.shape[0]
    local_ids = ids - jax.lax.axis_index(vocab) * n
    inside = (local_ids >= 0) & (local_ids < n)
    rows = jnp.take(table, jnp.where(inside, local_ids, 0), axis=0)
    return jax.lax.psum(jnp.where(inside[..., None], rows, jnp.zeros((), rows.dtype)), vocab)

  out = jax.shard_map(local, mesh=layout.mesh, in_specs=(spec, ids_spec),
                      out_specs=out_spec)(table, ids)
  return jnp.where(bad[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def shard_kernel(fn: Callable, args: Mapping[str, Any], names: Mapping[str, Sequence[str | None]],
                 out_names: Sequence[str | None]) -> Any:
  """Runs `fn(**args)` under `jax.shard_map` over the active layout's batch and head axes.

  `names` gives the logical names of every array argument (a dimension of size 1, a broadcast
  batch or head, stays whole); `out_names` those of the single output. Only batch and head
  dimensions are split: attention is independent across both, so each device computes its
  slice with no communication. Query heads and kv heads must map onto the same mesh axes
  (otherwise a device's query heads would not find their kv heads) or the heads stay whole.
  Without an active layout, or on one device, `fn` is called directly.
  """
  layout = _ACTIVE.get()
  if layout is None or layout.mesh.devices.size == 1:
    return fn(**args)
  allowed = {R.BATCH: layout.rules.axes(R.BATCH)}
  heads = layout.rules.axes(R.HEADS)
  if heads == layout.rules.axes(R.KV_HEADS):
    allowed[R.HEADS] = allowed[R.KV_HEADS] = heads

  def spec(x, dims):
    entries = []
    for size, name in zip(x.shape, dims):
      axes = tuple(a for a in allowed.get(name, ()) if layout.sizes[a] > 1)
      n = math.prod(layout.sizes[a] for a in axes)
      if not axes or size == 1 or size % n:
        entries.append(None)
      else:
        entries.append(axes if len(axes) > 1 else axes[0])
    return P(*entries)

  keys = [k for k, v in args.items() if v is not None and k in names]
  specs = {k: spec(args[k], names[k]) for k in keys}
  first = next(k for k in keys if len(names[k]) == len(out_names))
  out_spec = P(*[specs[first][names[first].index(n)] if n in names[first] else None
                 for n in out_names])
  fixed = {k: v for k, v in args.items() if k not in keys}

  def local(*arrays):
    return fn(**dict(zip(keys, arrays)), **fixed)

  return jax.shard_map(local, mesh=layout.mesh, in_specs=tuple(specs[k] for k in keys),
                       out_specs=out_spec, check_vma=False)(*[args[k] for k in keys])
