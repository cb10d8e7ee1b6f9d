"""Attention maps per layer and head, and attention rollout (CATALOG I)."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from analysis_models import tiny, tokens
from jaxformer.analysis import maps, rollout
from jaxformer.config import ConfigError
from jaxformer.models import family


@pytest.mark.slow
def test_maps_scanned_equal_unrolled_and_are_probabilities():
  x = tokens()
  got = {}
  for scan in (True, False):
    m = tiny(scan_layers=scan, num_layers=3)
    got[scan] = maps.attention_maps(m, lambda m: m(x))
  site = got[True]['stack/self_attn']
  assert site.layers == (0, 1, 2) and site.weights.shape == (3, 2, 2, 6, 6)
  np.testing.assert_allclose(site.weights, got[False]['stack/self_attn'].weights, atol=1e-6)
  w = np.asarray(site.weights)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert np.all(w[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)  # causal


@pytest.mark.slow
def test_layer_zero_is_the_first_layer():
  """The map listed as layer 0 is that of a 1-layer model holding the first layer's weights."""
  x = tokens()
  m3, m1 = tiny(num_layers=3), tiny(num_layers=1)
  first = jax.tree_util.tree_map_with_path(
      lambda path, a: a[:1] if any(getattr(k, 'key', None) == 'layers' for k in path) else a,
      nnx.state(m3, nnx.Param))
  nnx.update(m1, first)
  w3 = maps.attention_maps(m3, lambda m: m(x))['stack/self_attn'].weights
  w1 = maps.attention_maps(m1, lambda m: m(x))['stack/self_attn'].weights
  np.testing.assert_allclose(w3[0], w1[0], atol=1e-6)
  assert not np.allclose(w3[1], w1[0], atol=1e-3)


def test_rollout_equals_explicit_product():
  m = tiny()
  x = tokens()
  w = nnx.jit(lambda m: maps.attention_maps(m, lambda m: m(x))['stack/self_attn'].weights)(m)
  got = np.asarray(rollout.attention_rollout(w))
  a = np.asarray(w, np.float64).mean(axis=2)  # [L, B, T, T]
  for b in range(2):
    r = np.eye(6)
    for layer in range(2):
      hat = (a[layer, b] + np.eye(6)) / 2
      r = hat / hat.sum(-1, keepdims=True) @ r
    np.testing.assert_allclose(got[b], r, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  w = np.asarray(w)  # the maps themselves: causal probability rows
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert np.all(w[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)


@pytest.mark.slow
def test_encoder_decoder_sites():
  m = tiny('t5', num_layers=1)
  x = tokens()
  out = maps.attention_maps(m, lambda m: m(x, x[:, :4]))
  assert sorted(out) == ['decoder/cross_attn', 'decoder/self_attn', 'encoder/self_attn']
  assert out['decoder/cross_attn'].weights.shape == (1, 2, 2, 4, 6)


@pytest.mark.parametrize('override, words', [
    (dict(attention={'kind': 'linear'}), 'never formed'),
    (dict(attention={'impl': 'chunked'}), 'chunked core'),
])
def test_kinds_without_weights_are_refused(override, words):
  cfg = family('llama', d_model=16, num_layers=1, vocab_size=32, max_length=8, **override)
  with pytest.raises(ConfigError, match=words):
    maps.check_weights(cfg)


def test_families_with_own_attention_are_refused():
  cfg = family('transformer_xl', d_model=16, num_layers=1, vocab_size=32, max_length=8)
  with pytest.raises(ConfigError, match='cannot give attention weights'):
    maps.attention_maps(types.SimpleNamespace(cfg=cfg), lambda m: None)
