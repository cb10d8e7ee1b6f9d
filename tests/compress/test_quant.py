"""Weight quantization numerics (CATALOG H oracle): for every scheme, dequant(quant(w)) is within
half a quantization step of w for the values inside the calibrated range, and percentile
clipping returns the clipped value; int4 codes pack and unpack exactly; scales follow the
granularity; the stored tree round-trips; the QAT fake quantization is the STE; bad options
name their field."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.compress import quant
from jaxformer.compress.config import QuantScheme
from jaxformer.config import ConfigError
from jaxformer.finetune import lora

# A stacked attention output projection wo [layers, heads, head_dim, embed]: batch (0,),
# inputs (1, 2) flattened to 16, outputs (3,).
WO_AXES = ((0,), (1, 2), (3,))
# Every scheme; the default suite runs a subset with each (bits, granularity) pair, both
# symmetric and zero point, both calibrations, the others are slow.
FAST = {(8, 'tensor', True, 'minmax'), (8, 'channel', False, 'percentile'),
        (8, 'group', True, 'percentile'), (4, 'group', False, 'minmax'),
        (4, 'channel', True, 'minmax'), (4, 'tensor', False, 'percentile')}
SCHEMES = [pytest.param(QuantScheme(bits=b, granularity=g, group_size=8, symmetric=s,
                                    calibration=c, percentile=99.0),
                        marks=() if (b, g, s, c) in FAST else pytest.mark.slow,
                        id=f'int{b}-{g}-{"sym" if s else "zp"}-{c}')
           for b, g, s, c in itertools.product((8, 4), ('tensor', 'channel', 'group'),
                                               (True, False), ('minmax', 'percentile'))]


def weight(seed=0, shape=(2, 2, 8, 6)):
  w = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return w.at[0, 0, 0, 0].set(9.0)  # an outlier the percentile range leaves out


def roundtrip(w, axes, scheme):
  q = quant.quantize(w, axes, scheme)
  return q, quant.dequantize(q, w.shape, w.dtype)


def step_and_range(w, q, scheme, shape):
  """Per element of the flattened weight: the step s and the calibrated range [lo, hi]."""
  x = w.reshape(shape)
  calib = jax.jit(lambda v: quant.calibrate(v, quant.how(scheme, v.ndim, 1, 1), scheme))(x)
  scale = qarray_broadcast(q.scale, shape)
  if 'absmax' in calib:
    r = qarray_broadcast(calib['absmax'], shape)
    return scale, -r, r
  return scale, qarray_broadcast(calib['min'], shape), qarray_broadcast(calib['max'], shape)


def qarray_broadcast(x, shape):
  x = np.asarray(x, np.float32)
  for axis, (n, m) in enumerate(zip(shape, x.shape)):
    x = np.repeat(x, n // m, axis=axis)
  return x


@pytest.mark.parametrize('scheme', SCHEMES)
def test_dequantized_within_half_a_step(scheme):
  w = weight()
  q, dq = jax.jit(lambda v: roundtrip(v, WO_AXES, scheme))(w)
  flat = np.asarray(w.reshape(2, 16, 6))
  dq = np.asarray(dq).reshape(flat.shape)
  s, lo, hi = step_and_range(w, q, scheme, flat.shape)
  eps = 1e-6 * np.abs(flat).max()
  # Every value is within half a step of its clipped value; without percentile clipping the
  # range holds every value (so the clipped value is the value).
  clipped = np.clip(flat, lo, hi)
  assert np.all(np.abs(clipped - dq) <= s / 2 + eps)
  inside = (flat >= lo) & (flat <= hi)
  if scheme.calibration == 'minmax':
    assert inside.all()
  else:  # the outlier is clipped: it comes back at the edge of the range, not as itself
    assert not inside[0, 0, 0] and abs(dq[0, 0, 0] - 9.0) > s[0, 0, 0] / 2
  # The number of scales is the granularity's.
  per = {'tensor': (2, 1, 1), 'channel': (2, 1, 6), 'group': (2, 2, 6)}[scheme.granularity]
  assert q.scale.shape == per
  assert q.qvalue.dtype == quant.QTYPES[scheme.bits]


def test_minmax_step_is_the_range_over_the_codes():
  """Symmetric int8 per-tensor: s = max|w| / 127.5, and the largest value maps to 127 or 128
  saturated to 127, within half a step."""
  w = jnp.asarray([[0.5, -1.0], [2.55, 0.0]])
  q = jax.jit(lambda v: quant.quantize(v, ((), (0,), (1,)),
                                       QuantScheme(bits=8, granularity='tensor')))(w)
  np.testing.assert_allclose(np.asarray(q.scale), [[2.55 / 127.5]], rtol=1e-6)
  assert int(q.qvalue[1, 0]) == 127


@pytest.mark.parametrize('n', [pytest.param(6, marks=pytest.mark.slow), 7])
def test_int4_pack_roundtrip(n):
  codes = jnp.asarray(np.arange(-8, 8).repeat(4)[:3 * n * 2].reshape(3, n, 2), jnp.int4)
  packed = quant.pack_int4(codes, 1)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, (n + 1) // 2, 2)
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, 1, n), np.int8),
                                np.asarray(codes, np.int8))


def params_state(seed=0):
  """A tiny parameter tree: a stacked matrix, an embedding table, a norm."""
  k = jax.random.split(jax.random.key(seed), 2)
  return nnx.State({
      'embed': nnx.Param(jax.random.normal(k[0], (10, 8)), out_sharding=('vocab', 'embed'), eager_sharding=False),
      'wo': nnx.Param(weight(seed), out_sharding=('layers', 'heads', 'head_dim', 'embed'),
                     eager_sharding=False),
      # A norm's 'scale' is a float leftover, not a quantization scale.
      'norm': {'scale': nnx.Param(jnp.ones((2, 6)), out_sharding=('layers', 'embed'),
                                  eager_sharding=False)}})


@pytest.mark.parametrize('bits, symmetric, embeddings', [
    (4, False, True), pytest.param(8, True, False, marks=pytest.mark.slow)])
def test_stored_tree_roundtrip_and_size(bits, symmetric, embeddings):
  scheme = QuantScheme(bits=bits, granularity='group', group_size=8, symmetric=symmetric,
                       embeddings=embeddings)
  params = params_state()
  chosen = quant.targets(lora.flat_params(params), scheme, '--')
  assert set(chosen) == ({'embed', 'wo'} if embeddings else {'wo'})
  if embeddings:  # a table: one scale per row (token), groups along its width
    assert chosen['embed'] == ((), (1,), (0,))
  stored = jax.jit(lambda p: quant.quantize_params(p, chosen, scheme))(params)
  flat = lora.flat_params(stored)
  codes_dtype = jnp.uint8 if bits == 4 else jnp.int8
  assert flat['wo.codes'].get_value().dtype == codes_dtype
  assert ('wo.zero_point' in flat) == (not symmetric)
  back = lora.flat_params(jax.jit(
      lambda s: quant.dequantize_params(s, params, chosen, scheme))(stored))
  for k, axes in chosen.items():
    w = params[k].get_value()
    _, dq = jax.jit(lambda v, a=axes: roundtrip(v, a, scheme))(w)
    np.testing.assert_array_equal(np.asarray(back[k].get_value()), np.asarray(dq))
  np.testing.assert_array_equal(np.asarray(back['norm.scale'].get_value()), 1.0)
  size = quant.size_report(stored, params, chosen)
  n_wo, n_emb = 2 * 16 * 6, 80
  codes = n_wo * bits // 8 + (n_emb * bits // 8 if embeddings else 0)
  assert size['code_bytes'] == codes
  assert size['float_model_bytes'] == 4 * (n_wo + n_emb + 12)
  assert size['float_leftover_bytes'] == 4 * (12 + (0 if embeddings else n_emb))
  groups = 2 * 2 * 6 + (10 if embeddings else 0)  # wo: 2 layers x 2 groups x 6 outputs
  assert size['scale_bytes'] == groups * (4 if symmetric else 5)
  assert size['quantized_model_bytes'] == (size['code_bytes'] + size['scale_bytes']
                                           + size['float_leftover_bytes'])


def test_fake_quant_gradient_is_the_straight_through_estimator():
  """d loss(fq(w)) / dw == d loss / dw' at w' = dequant(quant(w)), for a nonlinear loss."""
  scheme = QuantScheme(bits=4, granularity='group', group_size=8, symmetric=False,
                       calibration='percentile', percentile=95.0)
  w = weight(1)
  x = jax.random.normal(jax.random.key(2), (3, 16))

  def loss_of(v):
    y = jnp.einsum('bi,lio->blo', x, v.reshape(2, 16, 6))
    return jnp.sum(jnp.tanh(y) ** 2)

  _, wq = jax.jit(lambda v: roundtrip(v, WO_AXES, scheme))(w)
  fq = jax.jit(lambda v: quant.fake_quant(v, WO_AXES, scheme))
  np.testing.assert_array_equal(np.asarray(fq(w)), np.asarray(wq))
  g = jax.jit(jax.grad(lambda v: loss_of(fq(v))))(w)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.jit(jax.grad(loss_of))(wq)))
  assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize('fields, match', [
    (dict(bits=2), r"--bits=2 is invalid: allowed values are \[4, 8\]"),
    (dict(granularity='row'), r"--granularity='row' is invalid"),
    (dict(calibration='percentile', percentile=0.0), r'--percentile=0.0 is invalid'),
    (dict(calibration='percentile', percentile=100.5), r'--percentile=100.5 is invalid'),
    (dict(calibration='kl'), r"--calibration='kl' is invalid"),
])
def test_bad_schemes_name_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    QuantScheme(**fields).validate('--')


def test_group_not_dividing_the_input_names_the_field():
  scheme = QuantScheme(bits=4, granularity='group', group_size=12)
  with pytest.raises(ConfigError, match=r"--group_size=12 is invalid: it must divide the input "
                     r"size 16 of 'wo'.*largest divisor of 16 up to 12 is 8"):
    quant.targets(lora.flat_params(params_state()), scheme, '--')
