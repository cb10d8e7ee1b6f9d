"""Weight quantization on the parameter tree: integer codes with Qwix's numerics.

A quantized parameter is a matrix w with batch axes (the stacked 'layers' and MoE 'expert' axes:
each slice is its own matrix), input axes I... and output axes O..., read from its logical names
(`jaxformer.finetune.lora.matrix_axes`); its input axes are flattened into one, as QLoRA's base
is (`lora.base_layout`), so that groups run along the whole input (the attention output wo's
heads x head_dim). An embedding table [vocab | position, embed] (only with
`QuantScheme.embeddings`) has its rows as outputs: one scale per token, which is one per output
channel when the table is tied to the output projection. Norms, biases and vectors stay float.

One scale s (and, without `symmetric`, one zero point z) per
  tensor   batch slice
  channel  batch slice and output channel
  group    batch slice, output channel and group of `group_size` consecutive inputs
with b bits the codes and the dequantized weight are (Qwix's `calibrate`,
`compute_scale_zero_point`, `quantize_with_scale_zero_point`, `dequantize`):

  symmetric:   s = r / (2^(b-1) - 1/2),       q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)
  zero point:  s = (hi - lo) / (2^b - 1),     z = round(-2^(b-1) - lo / s),
               q = clip(round(w / s + z), -2^(b-1), 2^(b-1) - 1)
  w' = s (q - z)

with r = max |w| (lo = min(w, 0), hi = max(w, 0)) over the values that share the scale under
'minmax' calibration; under 'percentile' r is the p-th percentile of |w| (lo, hi the (100 - p)-th
and p-th percentiles, written here: Qwix has no percentile calibration) and w is first clipped to
[-r, r] ([lo, hi]). Every value inside the calibrated range is then within half a step of its
dequantized value, |w - w'| <= s / 2 (Qwix's symmetric bound 2^(b-1) - 1/2 makes the extreme
buckets as wide as the others); values outside it come back as the clipped value, to half a step.

Fake quantization for QAT (`fake_quant`) returns w' in the forward pass and passes the gradient
straight through (identity through rounding and clipping; s and z are constants):
  forward  stop_gradient(w') + (w - stop_gradient(w)) = w' exactly,   d/dw = identity.

Stored form (post-training quantization, `quantize_params`): each quantized parameter becomes
{'codes', 'scale'[, 'zero_point']} in the flattened layout, int8 codes as int8 and int4 codes
packed two to a byte (uint8, low nibble first) along the input axis, zero points as int8, scales
in the parameter dtype; the other parameters stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from qwix._src.core import qarray

from jaxformer.compress.config import QuantScheme
from jaxformer.config import fail
from jaxformer.finetune import lora
from jaxformer.parallel.sharding import names_of
from jaxformer.train import optimizer as optim_lib

TABLE_AXES = ('vocab', 'position')
QTYPES = {4: jnp.int4, 8: jnp.int8}


# -------------------------------------------------------------------- which parameters
def targets(params: Mapping[str, nnx.Variable], scheme: QuantScheme, prefix: str
            ) -> dict[str, tuple]:
  """{path: (batch, input, output) axes} of the parameters `scheme` quantizes: matrices, and
  embedding tables when `scheme.embeddings`. Raises ConfigError (naming `prefix` + group_size)
  when a group does not divide a matrix's input size."""
  out = {}
  for key, axes in lora.matrices(params).items():
    v = params[key]
    names = names_of(v)
    if optim_lib.param_role(v, key).embedding:
      if not scheme.embeddings:
        continue
      k = len(axes[0])
      if names[k] in TABLE_AXES:  # a lookup table: one row per token (or position)
        axes = (axes[0], tuple(range(k + 1, len(names))), (k,))
    if scheme.granularity == 'group':
      shape = v.get_value().shape
      n_in = math.prod(shape[i] for i in axes[1])
      if n_in % scheme.group_size:
        fits = max(d for d in range(1, min(n_in, scheme.group_size) + 1) if n_in % d == 0)
        fail(f'{prefix}group_size', scheme.group_size,
             f'it must divide the input size {n_in} of {key!r} (shape {shape}); the largest '
             f'divisor of {n_in} up to {scheme.group_size} is {fits}')
    out[key] = axes
  return dict(sorted(out.items()))


def layout(shape: tuple[int, ...], names: tuple, axes: tuple) -> tuple[tuple, tuple, int]:
  """(shape, logical names, input axis) of a parameter as it is quantized: its input axes
  flattened into one (lora.base_layout); a table keeps its shape."""
  batch, ins, _ = axes
  if len(ins) == 1:
    return tuple(shape), tuple(names), ins[0]
  flat, flat_names = lora.base_layout(shape, names, axes, math.prod(shape[i] for i in ins), '')
  return flat, flat_names, len(batch)


def how(scheme: QuantScheme, ndim: int, in_axis: int, num_batch: int) -> qarray.HowToQuantize:
  if scheme.granularity == 'tensor':
    channel, tiled = tuple(range(num_batch)), {}
  else:
    channel = tuple(i for i in range(ndim) if i != in_axis)
    tiled = {in_axis: scheme.group_size} if scheme.granularity == 'group' else {}
  return qarray.HowToQuantize(qtype=QTYPES[scheme.bits], channelwise_axes=channel,
                              tiled_axes=tiled,
                              calibration_method='absmax' if scheme.symmetric else 'minmax')


# -------------------------------------------------------------------- one array
def calibrate(x: jax.Array, h: qarray.HowToQuantize, scheme: QuantScheme) -> dict[str, jax.Array]:
  """Qwix's calibration dict ({'absmax'} or {'min', 'max'}, shaped like the scale)."""
  if scheme.calibration == 'minmax':
    return qarray.calibrate(x, h)
  # Percentile: reduce what Qwix's calibrate reduces (tiled axes split into [tiles, size]).
  reduce, offset = [], 0
  for axis in range(x.ndim):
    if axis in h.channelwise_axes:
      continue
    if axis in h.tiled_axes:
      offset += 1
    reduce.append(axis + offset)
  shape = qarray.get_scale_shape(x.shape, h)
  split = qarray.split_axis(x, h.tiled_axes).astype(jnp.float32)
  p = scheme.percentile

  def pct(v, q):
    return jnp.percentile(v, q, axis=tuple(reduce), keepdims=True).reshape(shape).astype(x.dtype)

  if scheme.symmetric:
    return {'absmax': pct(jnp.abs(split), p)}
  return {'min': jnp.minimum(pct(split, 100.0 - p), 0), 'max': jnp.maximum(pct(split, p), 0)}


def quantize(w: jax.Array, axes: tuple, scheme: QuantScheme) -> qarray.QArray:
  """w -> a Qwix QArray in `layout(w.shape, ...)` (see the module docstring)."""
  shape, _, in_axis = layout(w.shape, (None,) * w.ndim, axes)
  x = w.reshape(shape)
  h = how(scheme, x.ndim, in_axis, len(axes[0]))
  calib = calibrate(x, h, scheme)
  if scheme.calibration == 'percentile':
    x = qarray.clip_to_calibration(x, calib, h.tiled_axes)
  scale, zero_point = qarray.compute_scale_zero_point(calib, h.qtype)
  return qarray.quantize_with_scale_zero_point(x, h.qtype, scale, zero_point)


def dequantize(q: qarray.QArray, shape: tuple[int, ...], dtype) -> jax.Array:
  return lora.dequantize_base(q, shape, dtype)


def fake_quant(w: jax.Array, axes: tuple, scheme: QuantScheme) -> jax.Array:
  """dequantize(quantize(w)) forward, identity backward (straight-through estimator)."""
  # Quantized from a constant: traced with tangents, the percentile's interpolation can round
  # differently from the same computation without them.
  c = jax.lax.stop_gradient(w)
  return dequantize(quantize(c, axes, scheme), w.shape, w.dtype) + (w - c)


def fake_quant_params(state: nnx.State, chosen: Mapping[str, tuple], scheme: QuantScheme
                      ) -> nnx.State:
  """`state` (the model's parameters) with every chosen parameter fake-quantized (QAT)."""
  flat = nnx.to_flat_state(state)
  return nnx.from_flat_state(
      [(p, v.replace(fake_quant(v.get_value(), chosen[k], scheme)) if k in chosen else v)
       for p, v in flat for k in (lora.path_key(p),)])


# -------------------------------------------------------------------- int4 packing
def pack_int4(q: jax.Array, axis: int) -> jax.Array:
  """int4 codes -> uint8, two along `axis` per byte (low nibble first; odd sizes padded)."""
  u = (q.astype(jnp.int8) & 0xF).astype(jnp.uint8)
  if u.shape[axis] % 2:
    u = jnp.pad(u, [(0, int(a == axis)) for a in range(u.ndim)])
  lo = jax.lax.slice_in_dim(u, 0, None, 2, axis)
  hi = jax.lax.slice_in_dim(u, 1, None, 2, axis)
  return lo | (hi << 4)


def unpack_int4(p: jax.Array, axis: int, size: int) -> jax.Array:
  """The inverse of `pack_int4` for `size` codes along `axis`."""
  both = jnp.stack([p & 0xF, p >> 4], axis=axis + 1)
  u = both.reshape(p.shape[:axis] + (2 * p.shape[axis],) + p.shape[axis + 1:]).astype(jnp.int8)
  u = jax.lax.slice_in_dim(u, 0, size, 1, axis)
  return jnp.where(u >= 8, u - 16, u).astype(jnp.int4)


# -------------------------------------------------------------------- the stored tree
def _meta_param(value, names) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def quantize_params(params: nnx.State, chosen: Mapping[str, tuple], scheme: QuantScheme
                    ) -> nnx.State:
  """The stored form (module docstring): chosen parameters as {'codes', 'scale'
  [, 'zero_point']} Params carrying their logical names (None along reduced axes), the others
  unchanged. Traceable (jax.eval_shape gives the abstract stored tree)."""
  out = []
  for p, v in nnx.to_flat_state(params):
    k = lora.path_key(p)
    if k not in chosen:
      out.append((p, v))
      continue
    w = v.get_value()
    shape, names, in_axis = layout(w.shape, names_of(v), chosen[k])
    q = quantize(w, chosen[k], scheme)
    codes = pack_int4(q.qvalue, in_axis) if scheme.bits == 4 else q.qvalue
    small = tuple(n if s == d else None for n, s, d in zip(names, q.scale.shape, shape))
    out.append((p + ('codes',), _meta_param(codes, names)))
    out.append((p + ('scale',), _meta_param(q.scale, small)))
    if q.zero_point is not None:
      out.append((p + ('zero_point',), _meta_param(q.zero_point.astype(jnp.int8), small)))
  return nnx.from_flat_state(out)


def dequantize_params(stored: nnx.State, templates: nnx.State, chosen: Mapping[str, tuple],
                      scheme: QuantScheme) -> nnx.State:
  """The model's parameters (laid out like `templates`, its abstract parameters) from the
  stored form: chosen parameters dequantized, the others as stored."""
  flat = lora.flat_params(stored)
  out = []
  for p, t in nnx.to_flat_state(templates):
    k = lora.path_key(p)
    if k not in chosen:
      out.append((p, flat[k]))
      continue
    shape, dtype = t.get_value().shape, t.get_value().dtype
    qshape, _, in_axis = layout(shape, (None,) * len(shape), chosen[k])
    codes = flat[f'{k}.codes'].get_value()
    if scheme.bits == 4:
      codes = unpack_int4(codes, in_axis, qshape[in_axis])
    zp = flat.get(f'{k}.zero_point')
    zp = None if zp is None else zp.get_value().astype(codes.dtype)
    q = qarray.QArray(codes, flat[f'{k}.scale'].get_value(), zp, QTYPES[scheme.bits])
    out.append((p, t.replace(dequantize(q, shape, dtype))))
  return nnx.from_flat_state(out)


def nbytes(tree: Any) -> int:
  """Bytes of the arrays in `tree` (int4 counts half a byte)."""
  return lora.nbytes(jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
                                  tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def size_report(stored: nnx.State, float_params: nnx.State, chosen: Mapping[str, tuple]
                ) -> dict[str, int | float]:
  """Bytes of the stored model by kind (codes, scales and zero points of the `chosen`
  parameters, float leftovers) and of the float model it came from."""
  kinds = {'codes': 0, 'scales': 0, 'float': 0}
  for k, v in lora.flat_params(stored).items():
    base, _, leaf = k.rpartition('.')
    kind = ('float' if base not in chosen else 'codes' if leaf == 'codes' else 'scales')
    kinds[kind] += nbytes(v)
  total, before = sum(kinds.values()), nbytes(float_params)
  return {'float_model_bytes': before, 'quantized_model_bytes': total,
          'code_bytes': kinds['codes'], 'scale_bytes': kinds['scales'],
          'float_leftover_bytes': kinds['float'], 'ratio': total / max(before, 1)}
