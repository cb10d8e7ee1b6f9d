"""Feed-forward (CATALOG D4): numpy float64 oracles for every activation and gating, init."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError, FFNConfig, ModelConfig
from jaxformer.layers import FeedForward, activation

D = 16

_erf = np.vectorize(math.erf)
NP_ACT = {
    'relu': lambda x: np.maximum(x, 0.0),
    'gelu': lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    'gelu_tanh': lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) *
                                                     (x + 0.044715 * x ** 3))),
    'silu': lambda x: x / (1.0 + np.exp(-x)),
    'tanh': np.tanh,
}


def _cfg(**ffn):
  return ModelConfig(d_model=D).replace(ffn=FFNConfig(**ffn))


def _randomise(module, seed=1, std=0.5):
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      p[...] = jnp.asarray(rng.normal(0.0, std, p.shape), p.dtype)


def _np(p):
  return np.asarray(p[...], np.float64)


@pytest.mark.parametrize('name', sorted(NP_ACT))
def test_activation_matches_numpy(name):
  x = np.linspace(-6, 6, 301)
  chex.assert_trees_all_close(activation(name)(jnp.asarray(x, jnp.float32)),
                              NP_ACT[name](x).astype(np.float32), atol=1e-6, rtol=1e-6)


def test_gelu_exact_and_tanh_differ_and_unknown_name_fails():
  x = jnp.asarray([1.0, -2.0])
  assert float(jnp.max(jnp.abs(activation('gelu')(x) - activation('gelu_tanh')(x)))) > 1e-5
  with pytest.raises(ConfigError, match='model.ffn.activation'):
    activation('swishy')


@pytest.mark.parametrize('act', sorted(NP_ACT))
@pytest.mark.parametrize('bias', [True, False])
def test_plain_ffn_matches_numpy(act, bias):
  ffn = FeedForward(_cfg(activation=act, bias=bias, hidden_dim=24), rngs=nnx.Rngs(0))
  _randomise(ffn)
  x = np.random.default_rng(0).normal(size=(2, 5, D))
  h = x @ _np(ffn.wi) + (_np(ffn.bi) if bias else 0.0)
  ref = NP_ACT[act](h) @ _np(ffn.wo) + (_np(ffn.bo) if bias else 0.0)
  assert hasattr(ffn, 'bo') == bias
  chex.assert_trees_all_close(ffn(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('act', ['silu', 'gelu', 'gelu_tanh', 'relu'])  # SwiGLU, GeGLU, ReGLU
@pytest.mark.parametrize('bias', [True, False])
def test_gated_ffn_matches_numpy(act, bias):
  ffn = FeedForward(_cfg(activation=act, gated=True, bias=bias), rngs=nnx.Rngs(0))
  _randomise(ffn)
  x = np.random.default_rng(0).normal(size=(2, 5, D))
  gate = x @ _np(ffn.wi_gate) + (_np(ffn.bi_gate) if bias else 0.0)
  up = x @ _np(ffn.wi_up) + (_np(ffn.bi_up) if bias else 0.0)
  ref = (NP_ACT[act](gate) * up) @ _np(ffn.wo) + (_np(ffn.bo) if bias else 0.0)
  chex.assert_trees_all_close(ffn(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)


def test_hidden_dims_and_logical_axes():
  plain = FeedForward(_cfg(), rngs=nnx.Rngs(0))
  assert plain.wi.shape == (D, 4 * D) and plain.wo.shape == (4 * D, D)
  gated = FeedForward(ModelConfig(d_model=48).replace(
      ffn=FFNConfig(gated=True)), rngs=nnx.Rngs(0))
  assert gated.wi_gate.shape == (48, 128)  # 8/3 * 48 = 128 (rounded up to a multiple of 8)
  assert not hasattr(gated, 'wi')
  names = {k: p.get_metadata()['out_sharding'] for k, p in nnx.iter_graph(gated)
           if isinstance(p, nnx.Param)}
  assert names[('wi_gate',)] == ('embed', 'mlp') and names[('wi_up',)] == ('embed', 'mlp')
  assert names[('wo',)] == ('mlp', 'embed') and names[('bi_gate',)] == ('mlp',)
  assert names[('bo',)] == ('embed',)


def test_init_std_and_scaled_residual_init():
  cfg = ModelConfig(d_model=64, num_layers=8, init_std=0.02, scaled_residual_init=True)
  cfg = cfg.replace(ffn=FFNConfig(hidden_dim=1024))
  ffn = FeedForward(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.std(np.asarray(ffn.wi[...])), 0.02, rtol=0.03)
  np.testing.assert_allclose(np.std(np.asarray(ffn.wo[...])), 0.02 / math.sqrt(16), rtol=0.03)
  np.testing.assert_array_equal(np.asarray(ffn.bi[...]), 0.0)
  xav = FeedForward(cfg.replace(init='xavier', scaled_residual_init=False), rngs=nnx.Rngs(0))
  limit = math.sqrt(6 / (64 + 1024))
  w = np.asarray(xav.wi[...])
  assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit


def test_dropout_on_hidden_activation():
  ffn = FeedForward(_cfg(dropout=0.5, bias=False, hidden_dim=D),
                    rngs=nnx.Rngs(params=0, dropout=1))
  ffn.wo[...] = jnp.eye(D)  # y is then the (dropped-out) hidden activation itself
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, D)), jnp.float32)
  h = np.asarray(activation('gelu')(x @ ffn.wi[...]))
  y_eval = ffn(x)
  chex.assert_trees_all_close(y_eval, h, atol=1e-6)
  y1, y2 = np.asarray(ffn(x, deterministic=False)), np.asarray(ffn(x, deterministic=False))
  assert not np.allclose(y1, y2)  # the stream advances between calls
  # Each hidden unit is either dropped or scaled by 1 / (1 - p) = 2, about half of each.
  dropped = np.isclose(y1, 0.0, atol=1e-7)
  np.testing.assert_allclose(y1[~dropped], 2.0 * h[~dropped], rtol=1e-6, atol=1e-6)
  assert 0.35 < dropped.mean() < 0.65
