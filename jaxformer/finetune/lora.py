"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) on the parameter tree.

For a target matrix W0 with input dimensions I... and output dimensions O... (after its batch
dimensions: the stacked 'layers' and the MoE 'expert' axes, each slice its own matrix):

    W = W0 + (alpha / r) A B,     A [..., I..., r] (Kaiming-uniform),  B [..., r, O...] (zeros)

so the adapted model equals the base model before training, and `merge` folds the update into
W0 for export. The inputs of a matrix are read from its logical names: the first axis, or
every axis but the last when the last is 'embed' and the first is not (the attention output
wo [heads, head_dim, embed], the FFN's wo [mlp, embed]); this is the contraction its layer
performs (jaxformer.layers.linear.dense).

The update is added to the weight inside the jitted step rather than as a separate x A B path
at every projection: every family, stacked (scanned) layer stack, pipeline and mesh layout then
takes LoRA without a change to a layer. The cost is one transient W-sized array per target per
step (the update), which XLA lays out like W.

LoRA dropout (`finetune.lora.dropout` p > 0) drops inputs of the low-rank path only:
x W0 + scale (drop(x) A) B. In training the step also attaches A, B and a dropout key next to
each target (`attach_dropout_paths`), and the target's projection site
(`jaxformer.layers.linear.project`) adds scale ((drop(x) - x) A) B to x (W0 + scale A B). The
targets must be matrices their modules compute through that site (PROJECTIONS: attention,
FFN, untied head, Mamba, convolution, adapters); evaluation, sampling and export use the merged
weight (no dropout).

Why not `qwix.apply_lora_to_model`: Qwix finds a module's weight by identity inside its
intercepted dot_general, which neither jaxformer's nnx.scan-ned stacks nor its custom-VJP
`dense` pass through (it fails inside nnx.scan). jaxformer uses Qwix's numerics for QLoRA's
base instead: `qwix.quantize` / `qwix.dequantize` with int4 (or int8) codes, one scale per
group of `base_group_size` inputs, per output channel and per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.layers import linear
from jaxformer.parallel.sharding import names_of

BATCH_AXES = ('layers', 'expert')
# Logical target names -> regexes over '.'-joined parameter paths.
ALIASES = {
    'q': r'attn\.wq$', 'k': r'attn\.wk$', 'v': r'attn\.wv$', 'o': r'attn\.wo$',
    'attention': r'attn\.w[qkvo]$',
    'ffn': r'ffn\.w[a-z_]*$',
    'head': r'(^|\.)head\.kernel$',
}


def path_key(path) -> str:
  return '.'.join(str(p) for p in path)


def flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
  """{'a.b.c': Variable} of an nnx.State."""
  return {path_key(p): v for p, v in nnx.to_flat_state(state)}


def matrix_axes(names: tuple) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
  """(batch, input, output) axis indices of a matrix by its logical names; None when the
  parameter is not a matrix (fewer than two axes besides its batch axes, or a norm)."""
  k = 0
  while k < len(names) and names[k] in BATCH_AXES:
    k += 1
  rest = names[k:]
  if len(rest) < 2 or 'norm' in rest:
    return None
  idx = tuple(range(k, len(names)))
  if rest[-1] == 'embed' and rest[0] != 'embed':
    return tuple(range(k)), idx[:-1], idx[-1:]
  return tuple(range(k)), idx[:1], idx[1:]


def matrices(params: Mapping[str, nnx.Variable]) -> dict[str, tuple]:
  """{path: (batch, input, output) axes} of every matrix parameter."""
  out = {}
  for key, v in params.items():
    names = names_of(v)
    axes = None if names is None or v.get_metadata().get('role') == 'bias' else matrix_axes(names)
    if axes is not None:
      out[key] = axes
  return out


def select_targets(params: Mapping[str, nnx.Variable], targets, rank: int) -> dict[str, tuple]:
  """The matrices LoRA adapts: {path: axes}. Raises ConfigError for a target that matches no
  matrix, or a rank larger than a target's smaller side."""
  mats = matrices(params)
  chosen = {}
  for t in targets:
    pattern = ALIASES.get(t, t)
    hits = [k for k in mats if re.search(pattern, k)]
    if not hits:
      raise ConfigError(
          f'finetune.lora.targets: {t!r} matches no matrix of this model; use a logical name '
          f'({sorted(ALIASES)}) or a regex over these parameter paths: {sorted(mats)}')
    chosen.update({k: mats[k] for k in hits})
  for key, (_, ins, outs) in chosen.items():
    shape = params[key].get_value().shape
    n_in, n_out = math.prod(shape[i] for i in ins), math.prod(shape[i] for i in outs)
    if rank > min(n_in, n_out):
      raise ConfigError(
          f'finetune.lora.rank={rank} is invalid for {key!r} (a {n_in} x {n_out} matrix): the '
          f'rank must be at most min(in, out) = {min(n_in, n_out)}')
  return dict(sorted(chosen.items()))


def num_lora_params(params: Mapping[str, nnx.Variable], chosen: Mapping[str, tuple],
                    rank: int) -> int:
  """sum over targets of (batch slices) x r x (inputs + outputs)."""
  total = 0
  for key, (batch, ins, outs) in chosen.items():
    shape = params[key].get_value().shape
    total += (math.prod(shape[i] for i in batch) * rank
              * (math.prod(shape[i] for i in ins) + math.prod(shape[i] for i in outs)))
  return total


def lora_factors(params: Mapping[str, nnx.Variable], chosen: Mapping[str, tuple], rank: int,
                 key: jax.Array) -> dict[str, dict[str, nnx.Param]]:
  """{path: {'a': Param [batch..., I..., r], 'b': Param [batch..., r, O...]}}; A is
  Kaiming-uniform over its fan-in (bound 1 / sqrt(in), as in the reference implementation),
  B is zero. The factors carry their matrix's logical names (None for r) and metadata."""
  out = {}
  for i, (path, (batch, ins, outs)) in enumerate(chosen.items()):
    v = params[path]
    w, names = v.get_value(), names_of(v)
    meta = {k: m for k, m in v.get_metadata().items() if k not in ('out_sharding', 'eager_sharding')}
    meta.pop('role', None)
    take = lambda ax: tuple(w.shape[j] for j in ax)  # noqa: E731
    name = lambda ax: tuple(names[j] for j in ax)  # noqa: E731
    a_shape = take(batch) + take(ins) + (rank,)
    b_shape = take(batch) + (rank,) + take(outs)
    bound = 1.0 / math.sqrt(math.prod(take(ins)))
    a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, w.dtype, -bound, bound)
    out[path] = {
        'a': nnx.Param(a, out_sharding=name(batch) + name(ins) + (None,), eager_sharding=False,
                       **meta),
        'b': nnx.Param(jnp.zeros(b_shape, w.dtype),
                       out_sharding=name(batch) + (None,) + name(outs), eager_sharding=False,
                       **meta)}
  return out


def delta(a: jax.Array, b: jax.Array, axes: tuple, scale: float) -> jax.Array:
  """scale * A B laid out like the target matrix [batch..., I..., O...]."""
  batch, ins, outs = axes
  nb = len(batch)
  lead = a.shape[:nb]
  in_shape, out_shape = a.shape[nb:-1], b.shape[nb + 1:]
  r = a.shape[-1]
  a2 = a.reshape(lead + (math.prod(in_shape), r))
  b2 = b.reshape(lead + (r, math.prod(out_shape)))
  d = jnp.einsum('...ir,...ro->...io', a2, b2) * scale
  return d.reshape(lead + in_shape + out_shape)


def check_layout(axes: tuple) -> None:
  """The update is built as [batch..., I..., O...]: the target must be laid out that way."""
  batch, ins, outs = axes
  order = batch + ins + outs
  if order != tuple(range(len(order))):
    raise ConfigError(f'LoRA target with axes {axes} is not laid out [batch, in, out]')


def apply(values: dict[str, jax.Array], factors: Mapping[str, Mapping[str, jax.Array]],
          axes: Mapping[str, tuple], scale: float) -> dict[str, jax.Array]:
  """{path: W0 + scale A B} for the targets (values: plain arrays by path)."""
  out = dict(values)
  for path, f in factors.items():
    w = values[path]
    out[path] = w + delta(f['a'], f['b'], axes[path], scale).astype(w.dtype)
  return out


# -------------------------------------------------------------------- LoRA dropout
def module_at(model: nnx.Module, path: str) -> tuple[Any, str]:
  """(the module holding the parameter at '.'-joined `path`, the parameter's name)."""
  *steps, name = path.split('.')
  m = model
  for s in steps:
    m = m[int(s)] if s.isdigit() else getattr(m, s)
  return m, name


def dropout_sites_missing(model: nnx.Module, targets: Mapping[str, tuple]) -> list[str]:
  """The targets whose product does not go through `jaxformer.layers.linear.project` (their
  module does not list them in PROJECTIONS): LoRA dropout has no input path to act on there."""
  out = []
  for path in targets:
    m, name = module_at(model, path)
    if name not in getattr(type(m), 'PROJECTIONS', ()):
      out.append(path)
  return out


def attach_dropout_paths(model: nnx.Module, factors: Mapping[str, Mapping[str, Any]],
                         targets: Mapping[str, tuple], key: jax.Array, rate: float,
                         scale: float) -> None:
  """Attaches each target's factors A, B and a dropout key (one per batch slice: per layer
  when stacked) next to it in `model` (built from the merged parameters, W0 + scale A B), so
  that `linear.project` adds scale ((drop(x) - x) A) B: LoRA with dropout on its input."""
  for i, path in enumerate(sorted(factors)):
    m, name = module_at(model, path)
    a, b = (factors[path][n].get_value() for n in ('a', 'b'))
    lead = a.shape[:len(targets[path][0])]
    k = jax.random.fold_in(key, i)
    keys = jax.random.split(k, lead) if lead else k
    setattr(m, name + linear.LORA_A, linear.LoraFactor(a))
    setattr(m, name + linear.LORA_B, linear.LoraFactor(b))
    setattr(m, name + linear.LORA_KEY, linear.LoraKey(keys, rate=rate, scale=scale))


# -------------------------------------------------------------------- QLoRA base
def base_layout(shape: tuple[int, ...], names: tuple, axes: tuple, group: int, path: str
                ) -> tuple[tuple[int, ...], tuple]:
  """(shape, logical names) of a frozen base matrix as it is quantized: its input axes
  flattened into one [batch..., In, O...] (named after the first input axis), so that groups of
  `group` run along the whole input of the matrix (wo's heads x head_dim, for instance)."""
  batch, ins, outs = axes
  n_in = math.prod(shape[i] for i in ins)
  if n_in % group:
    raise ConfigError(
        f'finetune.lora.base_group_size={group} does not divide the input size {n_in} of '
        f'{path!r} (shape {shape}); use a divisor of {n_in}')
  flat = tuple(shape[i] for i in batch) + (n_in,) + tuple(shape[i] for i in outs)
  return flat, tuple(names[i] for i in batch) + (names[ins[0]],) + tuple(names[i] for i in outs)


def quantize_base(w: jax.Array, axes: tuple, bits: int, group: int, path: str):
  """A frozen base matrix as a qwix QArray of shape `base_layout`: symmetric absmax codes, one
  scale per group of `group` inputs, per output channel and per batch slice."""
  shape, _ = base_layout(w.shape, (None,) * w.ndim, axes, group, path)
  tiled = len(axes[0])
  channel = tuple(i for i in range(len(shape)) if i != tiled)
  qtype = {4: jnp.int4, 8: jnp.int8}[bits]
  return qwix.quantize(w.reshape(shape), qtype, channelwise_axes=channel,
                       tiled_axes={tiled: group})


def dequantize_base(q, shape, dtype) -> jax.Array:
  return qwix.dequantize(q).astype(dtype).reshape(shape)


def nbytes(tree: Any) -> int:
  """Bytes of the arrays in `tree` (int4 codes count half a byte)."""
  total = 0
  for x in jax.tree.leaves(tree):
    bits = 4 if x.dtype in (jnp.int4, jnp.uint4) else np.dtype(x.dtype).itemsize * 8
    total += (math.prod(x.shape) * bits + 7) // 8
  return total
