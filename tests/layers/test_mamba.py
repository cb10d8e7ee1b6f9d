"""The Mamba layer (CATALOG D10): the parallel scan equals the sequential recurrence (outputs and
gradients), cached decoding equals the full forward, packed segments and padding are isolated."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import mamba as M


@functools.cache
def make(use_bias=True):
  # A large init so that outputs are O(1) and the tolerances mean something.
  cfg = ModelConfig.from_dict(dict(d_model=16, init_std=0.3,
                                   mamba=dict(d_state=4, d_conv=3, use_bias=use_bias)))
  return cfg, nnx.jit(lambda: M.Mamba(cfg, rngs=nnx.Rngs(0)))()


def with_scan(layer, cfg, scan):
  """The same parameters in a layer built for `mamba.scan=scan` (no initialiser compiled)."""
  other = nnx.eval_shape(lambda: M.Mamba(
      cfg.replace(mamba=dataclasses.replace(cfg.mamba, scan=scan)), rngs=nnx.Rngs(0)))
  nnx.update(other, nnx.state(layer))
  return other


def test_associative_scan_equals_recurrence_values_and_grads():
  """h_t = a_t h_{t-1} + b_t: log-depth scan == step-by-step loop, and so are the gradients."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  a = jax.random.uniform(k1, (2, 13, 5, 3), minval=0.2, maxval=1.0)
  b = jax.random.normal(k2, (2, 13, 5, 3))
  w = jax.random.normal(k3, b.shape)

  @jax.jit
  def run(a, b):
    h, loop = jnp.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):  # an explicit loop, independent of both scans
      h = a[:, t] * h + b[:, t]
      loop.append(h)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)) * w)  # noqa: E731
    return (M.scan_associative(a, b), M.scan_sequential(a, b), jnp.stack(loop, 1),
            jax.grad(loss(M.scan_associative), argnums=(0, 1))(a, b),
            jax.grad(loss(M.scan_sequential), argnums=(0, 1))(a, b))

  par, seq, loop, ga, gs = run(a, b)
  chex.assert_trees_all_close(par, seq, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(seq, loop, atol=1e-6)
  chex.assert_trees_all_close(ga, gs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_layer_parallel_equals_sequential_outputs_and_param_grads():
  cfg, layer = make()
  seq = with_scan(layer, cfg, 'sequential')
  u = jax.random.normal(jax.random.key(1), (2, 11, 16))

  def loss(model, u):
    y, _ = model(u)
    return jnp.sum(y ** 2), y

  grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True, argnums=(0, 1)))
  (_, yp), gp = grad(layer, u)
  (_, ys), gs = grad(seq, u)
  chex.assert_trees_all_close(yp, ys, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, nnx.state(gp[0])),
                              jax.tree.map(np.asarray, nnx.state(gs[0])), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(gp[1], gs[1], atol=1e-5, rtol=1e-5)
  assert float(jnp.std(yp)) > 0.1  # outputs of order one: the tolerances mean something


@pytest.mark.slow  # the model-level test (tests/models/test_mamba_models.py) runs by default
def test_cached_decoding_equals_full_forward_and_segments_are_isolated():
  """Decoding: all tokens one at a time from an empty cache, and a 4-token prompt then one at a
  time, equal the full forward. Packing: two packed segments with padding give each segment's
  own output, as if run alone, and the cache after a packed prompt is the last segment's, so
  decoding continues it alone."""
  _, layer = make()
  u = jax.random.normal(jax.random.key(2), (2, 12, 16))
  seg = jnp.array([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])

  @nnx.jit
  def run(m, u):
    full, runs = m(u[:, :9])[0], []
    for prefill in (0, 4):
      cache, outs = m.init_cache(2), []
      if prefill:
        y, cache = m(u[:, :prefill], cache=cache)
        outs.append(y)
      for t in range(prefill, 9):
        y, cache = m(u[:, t:t + 1], cache=cache)
        outs.append(y)
      runs.append(jnp.concatenate(outs, 1))
    v = u[:1]
    _, packed_cache = m(v[:, :9], seg[:, :9], cache=m.init_cache(1))
    step = m(v[:, 9:10], jnp.array([[2]]), cache=packed_cache)[0]
    packed = (m(v, seg)[0], m(v[:, 2:7])[0], m(v[:, 7:10])[0], step)
    return full, runs, cache, packed

  full, runs, cache, (y, a, b, step) = run(layer, u)
  assert float(jnp.std(full)) > 0.1  # outputs of order one: the tolerances mean something
  for stepped in runs:
    chex.assert_trees_all_close(stepped, full, atol=1e-5, rtol=1e-5)
  chex.assert_shape(cache['conv'], (2, 2, 32))
  chex.assert_shape(cache['ssm'], (2, 32, 4))
  chex.assert_trees_all_close(y[:, 2:7], a, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(y[:, 7:10], b, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(step[:, 0], b[:, -1], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(y[:, :2]), 0)
  np.testing.assert_array_equal(np.asarray(y[:, 10:]), 0)


def test_parameters_carry_logical_names():
  _, layer = make()
  for path, v in nnx.iter_graph(layer):
    if isinstance(v, nnx.Param):
      names = v.get_metadata()['out_sharding']
      assert len(names) == v.get_value().ndim, path
