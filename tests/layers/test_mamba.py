"""The Mamba layer (CATALOG D10): the parallel scan equals the sequential recurrence (outputs and
gradients), cached decoding equals the full forward, packed segments and padding are isolated."""

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
def make(scan='associative', use_bias=False):
  # A large init so that outputs are O(1) and the tolerances mean something.
  cfg = ModelConfig.from_dict(dict(d_model=16, init_std=0.3,
                                   mamba=dict(d_state=4, d_conv=3, scan=scan, use_bias=use_bias)))
  return cfg, nnx.jit(lambda: M.Mamba(cfg, rngs=nnx.Rngs(0)))()


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


def test_layer_parallel_equals_sequential_outputs_and_param_grads():
  cfg, layer = make('associative')
  _, seq = make('sequential')  # same seed: same parameters
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
  assert float(jnp.abs(yp).max()) > 1e-3  # not trivially zero


@pytest.mark.parametrize('prefill', [0, 4])
def test_cached_decoding_equals_full_forward(prefill):
  """A prompt of `prefill` tokens (0: none) into an empty cache, then one token at a time."""
  _, layer = make(use_bias=True)
  u = jax.random.normal(jax.random.key(2), (2, 9, 16))

  @nnx.jit
  def run(layer, u):
    full, _ = layer(u)
    cache = layer.init_cache(2)
    outs = []
    if prefill:
      y, cache = layer(u[:, :prefill], cache=cache)
      outs.append(y)
    for t in range(prefill, u.shape[1]):
      y, cache = layer(u[:, t:t + 1], cache=cache)
      outs.append(y)
    return full, jnp.concatenate(outs, 1), cache

  full, stepped, cache = run(layer, u)
  chex.assert_trees_all_close(stepped, full, atol=1e-5, rtol=1e-5)
  chex.assert_shape(cache['conv'], (2, 2, 32))
  chex.assert_shape(cache['ssm'], (2, 32, 4))


def test_packed_segments_do_not_leak_and_padding_is_inert():
  """Two packed segments (and padding) give each segment's own output, as if run alone."""
  _, layer = make()
  u = jax.random.normal(jax.random.key(4), (1, 12, 16))
  seg = jnp.array([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
  y, a, b = nnx.jit(lambda m, u: (m(u, seg)[0], m(u[:, 2:7])[0], m(u[:, 7:10])[0]))(layer, u)
  chex.assert_trees_all_close(y[:, 2:7], a, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(y[:, 7:10], b, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(y[:, :2]), 0)
  np.testing.assert_array_equal(np.asarray(y[:, 10:]), 0)


def test_cache_after_packed_prefill_continues_the_last_segment():
  """The state after a packed prompt is the last segment's: decoding continues it alone."""
  _, layer = make()
  u = jax.random.normal(jax.random.key(5), (1, 8, 16))
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2]])

  @nnx.jit
  def run(m, u):
    _, cache = m(u[:, :7], seg, cache=m.init_cache(1))
    return m(u[:, 7:8], jnp.array([[2]]), cache=cache)[0], m(u[:, 5:8])[0]

  y, alone = run(layer, u)
  chex.assert_trees_all_close(y[:, 0], alone[:, -1], atol=1e-5, rtol=1e-5)


def test_parameters_carry_logical_names():
  _, layer = make(use_bias=True)
  for path, v in nnx.iter_graph(layer):
    if isinstance(v, nnx.Param):
      names = v.get_metadata()['out_sharding']
      assert len(names) == v.get_value().ndim, path
