"""Dropout and stochastic depth (CATALOG D3), including layers stacked with nnx.vmap / nnx.scan."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import FFNConfig, ModelConfig
from jaxformer.layers import Dropout, DropPath, FeedForward

D = 16


def test_droppath_is_identity_at_eval_and_with_rate_zero():
  dp = DropPath(0.5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, D)), jnp.float32)
  np.testing.assert_array_equal(dp(x), x)
  np.testing.assert_array_equal(dp(x, deterministic=True), x)
  np.testing.assert_array_equal(DropPath(0.0, rngs=None)(x, deterministic=False), x)


def test_droppath_masks_whole_examples_and_preserves_expectation():
  p = 0.3
  dp = DropPath(p, rngs=nnx.Rngs(dropout=1))
  x = jnp.ones((4000, 3, 5))
  y = np.asarray(dp(x, deterministic=False))
  per_example = y.reshape(4000, -1)
  # Per example: all entries dropped (0) or all kept and scaled by 1 / (1 - p).
  assert np.all(per_example.min(1) == per_example.max(1))
  np.testing.assert_allclose(np.unique(per_example), [0.0, 1.0 / (1 - p)], rtol=1e-6)
  # E[y] = x: the std of the mean over 4000 examples is sqrt(p / (1 - p) / 4000) ~ 0.01.
  assert abs(per_example[:, 0].mean() - 1.0) < 0.05
  assert abs((per_example[:, 0] == 0).mean() - p) < 0.04
  assert not np.array_equal(y, np.asarray(dp(x, deterministic=False)))


def test_droppath_rejects_bad_rate_and_missing_rngs():
  with pytest.raises(ValueError, match='rate'):
    DropPath(1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='rngs'):
    DropPath(0.1, rngs=None)


def test_dropout_reexport_is_identity_at_eval():
  drop = Dropout(0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((3, 4))
  np.testing.assert_array_equal(drop(x, deterministic=True), x)
  assert np.isin(np.asarray(drop(x, deterministic=False)), [0.0, 2.0]).all()


class _Block(nnx.Module):
  """A residual FFN block with hidden dropout and stochastic depth: x + DropPath(FFN(x))."""

  def __init__(self, cfg, *, rngs):
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.drop_path = DropPath(0.5, rngs=rngs)

  def __call__(self, x, *, deterministic=True):
    return x + self.drop_path(self.ffn(x, deterministic=deterministic),
                              deterministic=deterministic)


def test_rng_modules_work_stacked_with_vmap_and_scan():
  cfg = ModelConfig(d_model=D).replace(ffn=FFNConfig(hidden_dim=32, dropout=0.5))
  num_layers = 3

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _Block(cfg, rngs=rngs)

  layers = nnx.jit(create)(nnx.Rngs(params=0, dropout=1))
  assert layers.ffn.wi.shape == (num_layers, D, 32)

  @functools.partial(nnx.jit, static_argnames=('deterministic',))
  def forward(x, layers, deterministic):
    # `deterministic` is a Python flag, so it is closed over rather than passed through scan.
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x, deterministic=deterministic)

    return body(x, layers)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, D)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=(0, 2))
  def unrolled(graphdef, state, deterministic):
    # The same computation layer by layer, each layer rebuilt from its slice of the state.
    y = x
    for i in range(num_layers):
      layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
      y = layer(y, deterministic=deterministic)
    return y

  y_eval = forward(x, layers, True)
  graphdef, state = nnx.split(layers)
  before = jax.tree.map(jnp.array, state)  # a copy: the scanned call advances the counters
  chex.assert_trees_all_close(y_eval, unrolled(graphdef, before, True), atol=1e-5, rtol=1e-5)

  y_train = forward(x, layers, False)
  chex.assert_tree_all_finite(y_train)
  assert not np.allclose(y_train, y_eval)
  # Same keys and counters as before the scanned call -> the same masks as the unrolled loop,
  # so every layer drew from its own split stream.
  chex.assert_trees_all_close(y_train, unrolled(graphdef, before, False), atol=1e-5, rtol=1e-5)
  keys = jax.random.key_data(layers.drop_path.rngs.key[...])
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == num_layers
  # The counters advanced inside scan, so the next training step draws new masks.
  assert not np.allclose(forward(x, layers, False), y_train)
