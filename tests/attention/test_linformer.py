"""B8 Linformer: k = n with E = F = I equals softmax; projections against a float64 reference;
causal use refused with the reason; sequences longer than max_length refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, dot_product_attention, registry
from jaxformer.config import AttentionConfig, ConfigError, ModelConfig

B, N, K, H = 2, 4, 2, 8


def build(max_length, **options):
  cfg = AttentionConfig(kind='linformer', options=options)
  return registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0),
                        max_length=max_length)


def qkv(t, s, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, t, N, H)), jax.random.normal(ks[1], (B, s, K, H)),
          jax.random.normal(ks[2], (B, s, K, H)))


def set_identity(core, n):
  eye = jnp.eye(n)
  for w in (core.e, core.f):
    if w is not None:
      w[...] = jnp.broadcast_to(eye, w.shape)


def reference(q, k, v, e, f, valid=None):
  """float64 softmax(Q (E_h^T K_h)^T / sqrt(H)) (F_h^T V_h); e, f [K, S, k]; valid [B, S]."""
  q, k, v, e, f = (np.asarray(a, np.float64) for a in (q, k, v, e, f))
  if valid is not None:
    k = k * valid[:, :, None, None]
    v = v * valid[:, :, None, None]
  kp = np.einsum('bskh,ksj->bjkh', k, e).repeat(N // K, axis=2)
  vp = np.einsum('bskh,ksj->bjkh', v, f).repeat(N // K, axis=2)
  logits = np.einsum('btnh,bjnh->bntj', q, kp) / np.sqrt(H)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bntj,bjnh->btnh', p, vp)


@pytest.mark.parametrize('sharing', ['headwise', 'kv', 'none'])
@pytest.mark.parametrize('softcap', [None, 2.0])
def test_identity_projections_equal_softmax(sharing, softcap):
  n = 8
  cfg = AttentionConfig(kind='linformer', logit_softcap=softcap,
                        options={'k': n, 'sharing': sharing})
  core = registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0),
                        max_length=n)
  set_identity(core, n)
  q, k, v = qkv(n, n)
  np.testing.assert_allclose(core(q, k, v, AttentionMask()),
                             dot_product_attention(q, k, v, logit_softcap=softcap), atol=1e-5)


@pytest.mark.parametrize('sharing', ['headwise', 'kv', 'none'])
def test_projections_against_float64_reference_with_padding_and_short_sequence(sharing):
  # s = 6 < max_length = 10: only the first 6 rows of E and F are used; row 1 has 2 padded keys.
  max_length, s, t, k_rows = 10, 6, 6, 3
  core = build(max_length, k=k_rows, sharing=sharing)
  r = np.random.default_rng(1)
  e = r.normal(size=core.e.shape).astype(np.float32)
  core.e[...] = e
  f = e if core.f is None else r.normal(size=core.f.shape).astype(np.float32)
  if core.f is not None:
    core.f[...] = f
  if sharing != 'none':
    e, f = np.broadcast_to(e, (K,) + e.shape), np.broadcast_to(f, (K,) + f.shape)
  valid = np.array([[1] * s, [1] * (s - 2) + [0] * 2], np.int32)
  q, k, v = qkv(t, s, seed=2)
  out = core(q, k, v, AttentionMask.build(q_len=t, padding=jnp.asarray(valid, bool)))
  ref = reference(q, k, v, e[:, :s], f[:, :s], valid)
  ref[1, s - 2:] = 0.0  # padded queries return 0
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_headwise_sharing_differs_from_per_head():
  assert build(8, k=4, sharing='none').e.shape == (K, 8, 4)
  assert build(8, k=4, sharing='headwise').e.shape == (8, 4)
  assert build(8, k=4, sharing='kv').f is None


def test_cross_attention_over_other_length_with_identity():
  # Encoder keys (s = 8 = max_length) for 5 decoder queries: queries are independent rows.
  core = build(8, k=8)
  set_identity(core, 8)
  q, k, v = qkv(5, 8, seed=3)
  np.testing.assert_allclose(core(q, k, v, AttentionMask()), dot_product_attention(q, k, v),
                             atol=1e-5)
  np.testing.assert_allclose(core(q[:, 2:3], k, v, AttentionMask()),
                             dot_product_attention(q, k, v)[:, 2:3], atol=1e-5)


def test_dropout_equals_dense_dropout_with_identity():
  n = 8
  cfg = AttentionConfig(kind='linformer', dropout=0.3, options={'k': n})
  core = registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0),
                        max_length=n)
  set_identity(core, n)
  q, k, v = qkv(n, n, seed=4)
  rng = jax.random.key(7)
  out = core(q, k, v, AttentionMask(), deterministic=False, dropout_rng=rng)
  ref = dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert not np.allclose(out, core(q, k, v, AttentionMask()), atol=1e-3)
  with pytest.raises(ValueError, match='no dropout_rng'):
    core(q, k, v, AttentionMask(), deterministic=False)


def model_cfg(**attention):
  return ModelConfig.from_dict({'d_model': 32, 'max_length': 8, 'attention': {
      'kind': 'linformer', 'num_heads': 4, 'options': {'k': 4}, **attention}})


def test_causal_and_decode_are_refused_with_the_reason():
  with pytest.raises(ConfigError, match='position t would see the future'):
    Attention(model_cfg(), causal=True, rngs=nnx.Rngs(0))
  layer = Attention(model_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='decode'):
    layer.init_cache(1, 8)
  with pytest.raises(ConfigError, match='window'):
    Attention(model_cfg(window=2), rngs=nnx.Rngs(0))


def test_sequence_longer_than_max_length_is_refused():
  layer = Attention(model_cfg(), rngs=nnx.Rngs(0))
  layer(jnp.ones((1, 8, 32)))
  with pytest.raises(ValueError, match='longer than max_length=8'):
    layer(jnp.ones((1, 9, 32)))


def test_bad_options_name_the_field():
  with pytest.raises(ConfigError, match='options.sharing'):
    build(8, sharing='layerwise')
  with pytest.raises(ConfigError, match='options.k'):
    build(8, k=0)
  with pytest.raises(ConfigError, match='allowed keys'):
    build(8, landmarks=4)


def test_cached_cross_attention_decoding_equals_full_pass():
  # Only the encoder side is projected, so decoder queries stay independent rows.
  cfg = ModelConfig.from_dict({'d_model': 32, 'max_length': 8, 'attention': {
      'kind': 'linformer', 'num_heads': 4, 'num_kv_heads': 2, 'options': {'k': 4}}})
  layer = Attention(cfg, cross=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (B, 5, 32))
  enc = jax.random.normal(jax.random.key(1), (B, 8, 32))
  enc_seg = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
  full, _ = layer(x, AttentionMask(kv_segment_ids=enc_seg), kv=enc)
  cache = layer.precompute_cross(enc, enc_seg)
  steps = [layer(x[:, i:i + 1], AttentionMask(), cache=cache)[0] for i in range(5)]
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)
