"""B13 FNet: the layer equals Re(W_T x W_D) with explicit complex128 DFT matrices; padding
invariance; no parameters; refusals with reasons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ConfigError, ModelConfig

B, T, D = 2, 8, 16


def model_cfg():
  return ModelConfig.from_dict({'d_model': D, 'max_length': T,
                                'attention': {'kind': 'fnet', 'num_heads': 2}})


def dft(n):
  """W[j, k] = exp(-2 pi i j k / n), complex128."""
  j = np.arange(n)
  return np.exp(-2j * np.pi * np.outer(j, j) / n)


def reference(x):
  """Re(W_T x W_D) for x [B, T, D] (W symmetric: the hidden DFT is x W_D)."""
  x = np.asarray(x, np.float64)
  t, d = x.shape[1:]
  return np.einsum('ts,bsd,de->bte', dft(t), x, dft(d)).real


def test_equals_explicit_dft_matrix_products():
  layer = Attention(model_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  y, cache = layer(x)
  assert cache is None
  # Entries are sums of T * D = 128 terms of size ~1 (|y| up to ~30): fp32 FFT rounding is
  # ~eps * log2(T D) * sqrt(T D) ~ 1e-5 relative to that scale, measured ~1e-6.
  np.testing.assert_allclose(y, reference(x), atol=1e-5)


def test_padding_zeroes_padded_positions_before_the_transform():
  layer = Attention(model_cfg(), rngs=nnx.Rngs(0))
  f = nnx.jit(lambda m, x, mask: m(x, mask)[0])
  pad = jnp.array([[1] * T, [1] * 5 + [0] * 3], bool)
  mask = AttentionMask.build(q_len=T, padding=pad)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  junk = x.at[1, 5:].set(100.0 * jax.random.normal(jax.random.key(2), (3, D)))
  y = f(layer, x, mask)
  np.testing.assert_array_equal(f(layer, junk, mask), y)
  ref = reference(np.asarray(x) * np.asarray(pad)[:, :, None]) * np.asarray(pad)[:, :, None]
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert np.all(np.asarray(y)[1, 5:] == 0.0)


def test_has_no_parameters_and_no_projections():
  layer = Attention(model_cfg(), rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(layer, nnx.Param))
  assert not layer.uses_projections


def test_causal_cross_and_decode_are_refused_with_the_reason():
  with pytest.raises(ConfigError, match='position t would see the future'):
    Attention(model_cfg(), causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='no separate keys'):
    Attention(model_cfg(), cross=True, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='no incremental cache'):
    Attention(model_cfg(), rngs=nnx.Rngs(0)).init_cache(1, T)
  cfg = ModelConfig.from_dict({'d_model': D, 'max_length': T, 'position': {'kind': 'alibi'},
                               'attention': {'kind': 'fnet', 'num_heads': 2}})
  with pytest.raises(ConfigError, match='no attention logits'):
    Attention(cfg, rngs=nnx.Rngs(0))
