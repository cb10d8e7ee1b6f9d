"""Static int8 activation quantization at the inputs of the model's matrices (W8A8 post-training
quantization; `python -m jaxformer.compress quantize --activations`, docs/compression.md).

A module names the matrices it computes through `jaxformer.layers.linear.project` in its class
attribute `PROJECTIONS` (attention: wq wk wv wo; FFN: wi / wi_gate / wi_up, wo; the Mamba,
convolution and adapter projections), and their inputs are the sites, unless `ACT_INPUTS`
says otherwise (the LM head quantizes its own input, tied or not, as 'input'; so the untied
head's kernel does not). With `model.act_quant.bits` = 8, `attach` gives each
such module one `ActRange` parameter per name, `<name>_act` = [lo, hi] (stacked like the
module's weights: one range per layer), and `quantize(module, name, x)`, which the module calls
on the activation x just before it meets that matrix, replaces x by its fake-quantized value:
one scale (and zero point) per tensor, from the calibrated range, with the numerics of the
weight schemes (jaxformer/compress/quant.py, Qwix's):

  symmetric:   s = a / (2^(b-1) - 1/2) with a = max(|lo|, |hi|),
               q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1)
  zero point:  s = (hi - lo) / (2^b - 1),  z = round(-2^(b-1) - lo / s),
               q = clip(round(x / s + z), -2^(b-1), 2^(b-1) - 1)
  x' = s (q - z)

so values inside [lo, hi] come back within half a step and values outside are clipped to it.
The gradient passes straight through (x' = x + stop_gradient(x' - x)), so the analysis
methods still differentiate a quantized model. One scale per tensor, not per channel: a scale per
input channel of the activation does not factor out of the integer product x . w, which is what
an int8 kernel computes; per-channel scales are for weights (their output channels).

Calibration (`observing`): while traced inside `with observing(method, percentile, symmetric)`,
`quantize` leaves x alone and writes this batch's range into the ActRange instead: min and max
('minmax'), or the (100 - p)-th and p-th percentiles ('percentile'); symmetric ranges are
[-a, a] with a the max (or p-th percentile) of |x|. nnx.scan hands the written ranges back
stacked per layer. `combine` merges the batches of the calibration split: the widest range
('minmax') or the mean of the per-batch ranges ('percentile').
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from qwix._src.core import qarray

SUFFIX = '_act'
BATCH_AXES = ('layers',)


class ActRange(nnx.Param):
  """[lo, hi] of the activations entering one matrix (per layer when stacked); NaN until
  calibrated."""


@dataclasses.dataclass(frozen=True)
class Observe:
  method: str          # 'minmax' or 'percentile'
  percentile: float
  symmetric: bool


_OBSERVE: contextvars.ContextVar[Observe | None] = contextvars.ContextVar('act_observe',
                                                                         default=None)


@contextlib.contextmanager
def observing(method: str, percentile: float, symmetric: bool):
  """Inside: `quantize` records each batch's activation range instead of quantizing."""
  token = _OBSERVE.set(Observe(method, percentile, symmetric))
  try:
    yield
  finally:
    _OBSERVE.reset(token)


# ---------------------------------------------------------------------- the model side
def attach(model: nnx.Module, bits: int, symmetric: bool) -> nnx.Module:
  """Adds an ActRange `<name>_act` for every name in `inputs(module)` that names one of
  its parameters (stacked like it), and an unstacked one for the name 'input' (the module's
  input, as the LM head's); other names (matrices this module was built without) are skipped.
  Returns `model`."""
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and inputs(m)]
  for m in modules:
    for name in inputs(m):
      w = getattr(m, name, None)
      if isinstance(w, nnx.Variable):
        names = tuple(w.get_metadata().get('out_sharding') or ())
        k = 0
        while k < len(names) and names[k] in BATCH_AXES:
          k += 1
        lead, shape = names[:k], w.get_value().shape[:k]
      elif name == 'input':
        lead, shape = (), ()
      else:
        continue  # the module was built without this matrix
      setattr(m, name + SUFFIX, ActRange(jnp.full(shape + (2,), jnp.nan, jnp.float32),
                                         out_sharding=lead + (None,), eager_sharding=False,
                                         bits=bits, symmetric=symmetric))
  return model


def inputs(module: nnx.Module) -> tuple[str, ...]:
  """The names whose inputs `module` quantizes: its class's ACT_INPUTS, else its PROJECTIONS
  (the matrices it computes through jaxformer.layers.linear.project)."""
  cls = type(module)
  return getattr(cls, 'ACT_INPUTS', getattr(cls, 'PROJECTIONS', ()))


def quantize(module: nnx.Module, name: str, x: jax.Array) -> jax.Array:
  """x, fake-quantized with the range `module.<name>_act` (module docstring); x itself when the
  module has no such range. Under `observing`, records x's range and returns x."""
  r = getattr(module, name + SUFFIX, None)
  if r is None:
    return x
  obs = _OBSERVE.get()
  if obs is not None:
    r.set_value(batch_range(x, obs).astype(r.get_value().dtype))
    return x
  meta = r.get_metadata()
  return fake_quant(x, r.get_value(), meta['bits'], meta['symmetric'])


def batch_range(x: jax.Array, obs: Observe) -> jax.Array:
  """[lo, hi] of one batch's activations x (module docstring)."""
  x = x.astype(jnp.float32)
  if obs.symmetric:
    a = jnp.abs(x)
    a = jnp.max(a) if obs.method == 'minmax' else jnp.percentile(a, obs.percentile)
    return jnp.stack([-a, a])
  if obs.method == 'minmax':
    lo, hi = jnp.min(x), jnp.max(x)
  else:
    lo, hi = jnp.percentile(x, 100.0 - obs.percentile), jnp.percentile(x, obs.percentile)
  return jnp.stack([jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)])


def fake_quant(x: jax.Array, rng: jax.Array, bits: int, symmetric: bool) -> jax.Array:
  """dequantize(quantize(x)) with one scale for the tensor from rng = [lo, hi]; the gradient is
  the identity (straight through)."""
  qtype = {8: jnp.int8, 4: jnp.int4}[bits]
  ones = (1,) * x.ndim
  c = jax.lax.stop_gradient(x).astype(jnp.float32)
  rng = rng.astype(jnp.float32)
  if symmetric:
    calib = {'absmax': jnp.maximum(jnp.abs(rng[0]), jnp.abs(rng[1])).reshape(ones)}
  else:
    calib = {'min': rng[0].reshape(ones), 'max': rng[1].reshape(ones)}
  scale, zero_point = qarray.compute_scale_zero_point(calib, qtype)
  q = qarray.quantize_with_scale_zero_point(c, qtype, scale, zero_point)
  y = qarray.dequantize(q).astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)


# ---------------------------------------------------------------------- calibration results
def ranges(state) -> dict[str, jax.Array]:
  """{path: range} of the ActRange parameters in `state` (an nnx.State or module)."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state, ActRange)
  return {'.'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)
          if isinstance(v, ActRange)}


def combine(batches: list[dict[str, jax.Array]], method: str) -> dict[str, jax.Array]:
  """The calibration split's ranges from the per-batch ones (module docstring)."""
  out = {}
  for k in batches[0]:
    stack = jnp.stack([b[k] for b in batches])
    if method == 'minmax':
      out[k] = jnp.stack([jnp.min(stack[..., 0], 0), jnp.max(stack[..., 1], 0)], -1)
    else:
      out[k] = jnp.mean(stack, 0)
  return out

