"""Static activation quantization (jaxformer/layers/act_quant.py): the fake quantizer's grid and
half-step bound, its straight-through gradient, the per-batch ranges against numpy, the
calibrated ranges against the activations that really enter the matrices, and the same ranges
from the scanned and the unrolled stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers import act_quant
from jaxformer.models import build_model


@pytest.mark.parametrize('symmetric', [True, False], ids=['symmetric', 'zero-point'])
def test_fake_quant_is_on_the_grid_within_half_a_step(symmetric):
  x = jax.random.normal(jax.random.key(0), (4, 16, 32)) * 3 + (0.0 if symmetric else 1.0)
  lo, hi = (-6.0, 6.0) if symmetric else (-4.0, 7.0)
  rng = jnp.array([lo, hi])
  y = np.asarray(act_quant.fake_quant(x, rng, 8, symmetric))
  s = (hi - lo) / 255 if not symmetric else max(abs(lo), abs(hi)) / 127.5  # the int8 step
  inside = (np.asarray(x) >= lo) & (np.asarray(x) <= hi)
  assert inside.mean() > 0.9 and not inside.all()
  # Inside the range: within half a step; outside: the clipped value, within half a step.
  clipped = np.clip(np.asarray(x), lo, hi)
  assert np.all(np.abs(y - clipped) <= s / 2 * (1 + 1e-5))
  # On the grid s (q - z) with at most 256 distinct codes.
  codes = y / s
  offset = 0.0 if symmetric else codes.min() - np.round(codes.min())
  np.testing.assert_allclose(codes - offset, np.round(codes - offset), atol=1e-3)
  assert len(np.unique(np.round(codes - offset))) <= 256


def test_fake_quant_gradient_is_straight_through():
  x = jax.random.normal(jax.random.key(1), (8, 16))
  g = jax.grad(lambda v: jnp.sum(act_quant.fake_quant(v, jnp.array([-1.0, 1.0]), 8, True)
                                 * jnp.arange(16.0)))(x)
  np.testing.assert_array_equal(g, np.broadcast_to(np.arange(16.0), x.shape))


@pytest.mark.parametrize('method, symmetric', [('minmax', True), ('minmax', False),
                                               ('percentile', True), ('percentile', False)])
def test_batch_range_matches_numpy(method, symmetric):
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 64, 8))) + 0.5
  got = np.asarray(act_quant.batch_range(jnp.asarray(x), act_quant.Observe(method, 99.0,
                                                                           symmetric)))
  if symmetric:
    a = np.abs(x).max() if method == 'minmax' else np.percentile(np.abs(x), 99.0)
    want = [-a, a]
  elif method == 'minmax':
    want = [min(x.min(), 0), max(x.max(), 0)]
  else:
    want = [min(np.percentile(x, 1.0), 0), max(np.percentile(x, 99.0), 0)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_combine_minmax_is_the_range_of_all_batches():
  a, b = {'s': jnp.array([[-1.0, 2.0], [-3.0, 1.0]])}, {'s': jnp.array([[-2.0, 1.0], [-1.0, 4.0]])}
  np.testing.assert_array_equal(act_quant.combine([a, b], 'minmax')['s'],
                                [[-2.0, 2.0], [-3.0, 4.0]])
  np.testing.assert_array_equal(act_quant.combine([a, b], 'percentile')['s'],
                                [[-1.5, 1.5], [-2.0, 2.5]])


def model_cfg(**kw):
  return ModelConfig.from_dict(dict(dict(vocab_size=64, d_model=32, num_layers=3, max_length=32,
                                         attention=dict(num_heads=4), act_quant=dict(bits=8)),
                                    **kw))


def observe(model, ids, method='minmax', symmetric=True):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fn(params, rest, ids):
    m = nnx.merge(graphdef, params, rest)
    with act_quant.observing(method, 99.0, symmetric):
      m(ids)
    return act_quant.ranges(m)

  return jax.jit(fn)(params, rest, ids)


def test_calibrated_ranges_are_those_of_the_matrix_inputs():
  """The head's range is the min / max of the final hidden state that enters it, and each
  layer's query-projection range that of its normed input; and the ranges are per layer."""
  model = build_model(model_cfg(tie_embeddings=False))
  sites = act_quant.ranges(model)
  assert 'head.input_act' in sites and sites['head.input_act'].shape == (2,)
  assert sites['stack.layers.blocks.0.self_attn.wq_act'].shape == (3, 2)
  assert all(np.isnan(v).all() for v in sites.values())  # uncalibrated
  ids = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)
  got = observe(model, ids, symmetric=False)
  # The same weights without ranges (attach draws no random numbers); the hidden state the
  # head reads.
  plain = build_model(model_cfg(tie_embeddings=False, act_quant=dict(bits=0)))
  h = np.asarray(plain(ids).hidden)
  np.testing.assert_allclose(got['head.input_act'], [min(h.min(), 0), max(h.max(), 0)],
                             rtol=1e-5)
  wq = np.asarray(got['stack.layers.blocks.0.self_attn.wq_act'])
  assert np.isfinite(wq).all() and len({tuple(r) for r in wq.round(6)}) == 3


def test_scanned_and_unrolled_stacks_calibrate_alike():
  ids = jax.random.randint(jax.random.key(4), (2, 16), 0, 64)
  scanned = observe(build_model(model_cfg(ffn=dict(gated=True))), ids, 'percentile')
  unrolled = observe(build_model(model_cfg(ffn=dict(gated=True), scan_layers=False)), ids,
                     'percentile')
  assert set(scanned) == set(unrolled) and 'stack.layers.blocks.0.ffn.wi_gate_act' in scanned
  for k, v in scanned.items():
    np.testing.assert_allclose(v, unrolled[k], rtol=1e-5, err_msg=k)


def test_quantized_forward_uses_the_ranges():
  """With calibrated ranges the forward pass quantizes every covered input: the logits move
  (a little) from the float model's, and narrowing one range moves them more."""
  cfg = model_cfg()
  model = build_model(cfg)
  ids = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)
  ranges = observe(model, ids)
  float_logits = np.asarray(build_model(model_cfg(act_quant=dict(bits=0)))(ids).logits)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def logits_with(rs):
    flat = [(p, v.replace(rs['.'.join(map(str, p))]) if isinstance(v, act_quant.ActRange) else v)
            for p, v in nnx.to_flat_state(params)]
    return np.asarray(nnx.merge(graphdef, nnx.from_flat_state(flat), rest)(ids).logits)

  quantized = logits_with(ranges)
  err = np.abs(quantized - float_logits).max()
  assert 0 < err < 0.05 * np.abs(float_logits).max()
  narrow = dict(ranges, **{'head.input_act': ranges['head.input_act'] / 4})
  assert np.abs(logits_with(narrow) - float_logits).max() > 2 * err


def test_act_quant_bits_are_checked():
  with pytest.raises(ConfigError, match='model.act_quant.bits'):
    model_cfg(act_quant=dict(bits=4))


def test_reversible_layers_refuse_activation_ranges():
  with pytest.raises(ConfigError, match='model.act_quant.bits.*reversible'):
    model_cfg(reversible=True)
