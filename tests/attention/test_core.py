"""A1, A2, A10: the dot-product core against a naive float64 numpy softmax(QK^T/sqrt(d)+M)V."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import AttentionMask, DotProductAttention, dot_product_attention
from jaxformer.attention import registry
from jaxformer.config import AttentionConfig, ConfigError

B, T, S, N, H = 2, 6, 6, 4, 8


def _qkv(seed=0, b=B, t=T, s=S, n=N, k=N, h=H):
  r = np.random.default_rng(seed)
  return (r.normal(size=(b, t, n, h)).astype(np.float32),
          r.normal(size=(b, s, k, h)).astype(np.float32),
          r.normal(size=(b, s, k, h)).astype(np.float32))


def reference(q, k, v, allowed=None, bias=None, scale=None, softcap=None):
  """float64 numpy; allowed [B|1, N|1, T, S] bool; rows with no visible key give 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = np.einsum('btnh,bsnh->bnts', q, k) * scale
  if bias is not None:
    s = s + bias
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  if allowed is None:
    allowed = np.ones(s.shape, bool)
  allowed = np.broadcast_to(allowed, s.shape)
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(allowed, np.exp(s - m), 0.0)
  z = e.sum(-1, keepdims=True)
  p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)
  return np.einsum('bnts,bsnh->btnh', p, v), p


def _pad():
  return np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


def _segments():
  return np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 3, 3]], np.int32)


ti, si = np.arange(T)[:, None], np.arange(S)[None, :]


def _case(name):
  """(AttentionMask, numpy allowed [B|1, 1, T, S], additive bias or None)."""
  pad = _pad()
  if name == 'none':
    return None, None, None
  if name == 'padding':
    allowed = pad[:, None, :, None] & pad[:, None, None, :]
    return AttentionMask.build(q_len=T, padding=jnp.asarray(pad)), allowed, None
  if name == 'causal':
    return AttentionMask(causal=True), (si <= ti)[None, None], None
  if name == 'padding_causal':
    allowed = pad[:, None, :, None] & pad[:, None, None, :] & (si <= ti)
    return AttentionMask.build(q_len=T, padding=jnp.asarray(pad), causal=True), allowed, None
  if name == 'segments':
    seg = _segments()
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
               & (seg[:, None, :] > 0))[:, None] & (si <= ti)
    return AttentionMask.build(q_len=T, segment_ids=jnp.asarray(seg), causal=True), allowed, None
  if name == 'window_causal':
    return AttentionMask(causal=True, window=3), ((si <= ti) & (ti - si < 3))[None, None], None
  if name == 'window_bidirectional':
    return AttentionMask(window=2), (np.abs(ti - si) < 2)[None, None], None
  if name == 'boolean':
    extra = np.random.default_rng(5).random((B, N, T, S)) < 0.6
    return AttentionMask(extra=jnp.asarray(extra)), extra, None
  if name == 'bias':
    bias = np.random.default_rng(6).normal(size=(1, N, T, S)).astype(np.float32) * 2
    return None, None, bias
  raise ValueError(name)


CASES = ['none', 'padding', 'causal', 'padding_causal', 'segments', 'window_causal',
         'window_bidirectional', 'boolean', 'bias']


@pytest.mark.parametrize('name', CASES)
def test_matches_numpy(name):
  q, k, v = _qkv()
  mask, allowed, bias = _case(name)
  out, w = dot_product_attention(q, k, v, mask, bias=bias, return_weights=True)
  ref, p = reference(q, k, v, allowed, bias)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(w, p, atol=1e-6)


def test_fully_masked_rows_are_zero_with_finite_grads():
  q, k, v = _qkv()
  pad = _pad()
  mask = AttentionMask.build(q_len=T, padding=jnp.asarray(pad))
  out = dot_product_attention(q, k, v, mask)
  assert np.all(np.asarray(out)[0, 4:] == 0.0)  # padded queries see nothing: exactly zero
  assert np.isfinite(np.asarray(out)).all()
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask) ** 2),
                           argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # A mask with no visible key anywhere.
  none = AttentionMask(extra=jnp.zeros((1, 1, T, S), bool))
  sq, g = jax.jit(jax.value_and_grad(
      lambda q: jnp.sum(dot_product_attention(q, k, v, none) ** 2)))(q)
  assert float(sq) == 0.0
  assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize('kv_heads', [1, 2])
def test_grouped_query_equals_mha_with_repeated_kv(kv_heads):
  q, k, v = _qkv(seed=1, k=kv_heads)
  mask = AttentionMask.build(q_len=T, padding=jnp.asarray(_pad()), causal=True)
  g = N // kv_heads
  gqa = dot_product_attention(q, k, v, mask)
  mha = dot_product_attention(q, np.repeat(k, g, axis=2), np.repeat(v, g, axis=2), mask)
  np.testing.assert_allclose(gqa, mha, atol=1e-6)
  allowed = _pad()[:, None, :, None] & _pad()[:, None, None, :] & (si <= ti)
  np.testing.assert_allclose(gqa, reference(q, k, v, allowed)[0], atol=1e-5)


def test_cross_lengths_and_scale():
  q, k, v = _qkv(seed=2, t=3, s=7, k=2)
  out = dot_product_attention(q, k, v, scale=0.3)
  np.testing.assert_allclose(out, reference(q, k, v, scale=0.3)[0], atol=1e-5)


def test_softcap():
  q, k, v = _qkv(seed=3)
  q = q * 4  # large logits so the cap matters
  out = dot_product_attention(q, k, v, AttentionMask(causal=True), logit_softcap=2.0)
  ref = reference(q, k, v, (si <= ti)[None, None], softcap=2.0)[0]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert np.abs(ref - reference(q, k, v, (si <= ti)[None, None])[0]).max() > 1e-2


def test_dropout():
  q, k, v = _qkv(seed=4)
  mask = AttentionMask(causal=True)
  clean = dot_product_attention(q, k, v, mask)
  same = dot_product_attention(q, k, v, mask, dropout_rate=0.0, dropout_rng=jax.random.key(0))
  np.testing.assert_array_equal(clean, same)
  f = jax.jit(jax.vmap(lambda key: dot_product_attention(q, k, v, mask, dropout_rate=0.5,
                                                         dropout_rng=key)))
  samples = f(jax.random.split(jax.random.key(1), 2000))
  assert np.abs(np.asarray(samples[0] - clean)).max() > 1e-2
  # Inverted scaling keeps the expectation: E[out] = out without dropout, within 5 standard
  # errors of the sample mean per element.
  samples = np.asarray(samples, np.float64)
  stderr = samples.std(0) / np.sqrt(len(samples))
  assert np.all(np.abs(samples.mean(0) - np.asarray(clean)) <= 5 * stderr + 1e-6)
  # Without inverted scaling the mean would be off by the keep probability.
  assert np.any(np.abs(0.5 * samples.mean(0) - np.asarray(clean)) > 5 * stderr + 1e-6)


def test_core_module_contract():
  cfg = AttentionConfig(num_heads=N, dropout=0.5, logit_softcap=5.0)
  core = registry.build(cfg, num_heads=N, num_kv_heads=2, head_dim=H, rngs=nnx.Rngs(0),
                        needed=set(registry.FEATURES))
  assert isinstance(core, DotProductAttention)
  q, k, v = _qkv(seed=5, k=2)
  mask = AttentionMask(causal=True)
  np.testing.assert_allclose(
      core(q, k, v, mask), dot_product_attention(q, k, v, mask, logit_softcap=5.0), atol=1e-6)
  with pytest.raises(ValueError, match='dropout_rng'):
    core(q, k, v, mask, deterministic=False)
  with pytest.raises(ConfigError, match='sow_weights'):
    registry.build(AttentionConfig(options={'bogus': 1}), num_heads=N, num_kv_heads=N,
                   head_dim=H, rngs=nnx.Rngs(0))


def test_core_sows_weights_when_asked():
  cfg = AttentionConfig(num_heads=N, options={'sow_weights': True})
  core = registry.build(cfg, num_heads=N, num_kv_heads=N, head_dim=H, rngs=nnx.Rngs(0))
  q, k, v = _qkv(seed=6)
  _, inter = nnx.capture(lambda m: m(q, k, v, AttentionMask(causal=True)), nnx.Intermediate)(core)
  (w,) = inter['attention_weights'].get_value()
  np.testing.assert_allclose(w, reference(q, k, v, (si <= ti)[None, None])[1], atol=1e-6)
