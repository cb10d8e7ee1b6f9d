"""A7: memory-efficient chunked attention equals the dense 'xla' core and stays sub-quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, dot_product_attention, registry
from jaxformer.attention.chunked import chunked_attention
from jaxformer.config import AttentionConfig, ConfigError, ModelConfig
from jaxformer.layers.positions import alibi_bias

B, N, K, H = 2, 4, 2, 8


def _qkv(t, s, seed=0, n=N, k=K):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(B, t, n, H)), jnp.float32),
          jnp.asarray(r.normal(size=(B, s, k, H)), jnp.float32),
          jnp.asarray(r.normal(size=(B, s, k, H)), jnp.float32))


def _case(name, t, s):
  """(mask, bias, softcap, heads (N, K)) for T queries over S keys."""
  r = np.random.default_rng(1)
  pad = jnp.asarray(np.arange(s)[None] < np.array([[s], [s - 3]]))
  if name == 'causal':
    return AttentionMask(causal=True), None, None, (N, K)
  if name == 'padding':
    return AttentionMask.build(q_len=t, padding=pad), None, None, (N, K)
  if name == 'segments':
    seg = np.ones((B, s), np.int32)
    seg[0, s // 3:] = 2
    seg[1, s // 2:] = 3
    seg[1, -2:] = 0
    return AttentionMask.build(q_len=t, segment_ids=jnp.asarray(seg), causal=True), None, None, \
        (N, K)
  if name == 'window_causal':
    return AttentionMask(causal=True, window=3), None, None, (N, K)
  if name == 'window_bidirectional':
    return AttentionMask(window=2), None, None, (N, K)
  if name == 'bias_softcap':
    bias = jnp.asarray(r.normal(size=(B, N, t, s)) * 2.0, jnp.float32)
    return AttentionMask(causal=True), bias, 3.0, (N, K)
  if name == 'head_bias_mqa':
    bias = jnp.asarray(r.normal(size=(1, N, t, s)), jnp.float32)
    return AttentionMask.build(q_len=t, padding=pad), bias, None, (N, 1)
  if name == 'extra_mha':
    extra = jnp.asarray(r.random((B, 1, t, s)) < 0.6)
    return AttentionMask(extra=extra), None, None, (N, N)
  raise ValueError(name)


CASES = ['causal', 'padding', 'segments', 'window_causal', 'window_bidirectional',
         'bias_softcap', 'head_bias_mqa', 'extra_mha']


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('t, qc, kc', [(8, 4, 2), (11, 3, 4)])
def test_outputs_and_gradients_equal_dense(case, t, qc, kc):
  """Self-attention, lengths multiples of the chunks or not (padded internally)."""
  mask, bias, cap, (n, k) = _case(case, t, t)
  q, kk, v = _qkv(t, t, n=n, k=k)

  def loss(fn, q, kk, v, bias):
    out = fn(q, kk, v, mask, bias=bias, logit_softcap=cap)
    return jnp.sum(out * jnp.cos(out)), out

  chunked = lambda *a, **kw: chunked_attention(*a, query_chunk=qc, key_chunk=kc, **kw)
  argnums = (1, 2, 3, 4) if bias is not None else (1, 2, 3)
  (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(chunked, q, kk, v, bias)
  (_, ref), ref_grads = jax.value_and_grad(loss, argnums, has_aux=True)(
      dot_product_attention, q, kk, v, bias)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, rg, atol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q, k, v = _qkv(6, 6)
  seg = jnp.asarray([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
  mask = AttentionMask.build(q_len=6, segment_ids=seg)
  f = lambda q: chunked_attention(q, k, v, mask, query_chunk=4, key_chunk=4)
  out = f(q)
  assert np.all(np.asarray(out)[0, 3:] == 0.0) and np.all(np.asarray(out)[1, :2] == 0.0)
  assert np.all(np.isfinite(jax.grad(lambda q: f(q).sum())(q)))


@pytest.mark.parametrize('t', [1, 3])
def test_decode_and_cross_lengths_equal_dense(t):
  """T != S: new queries at absolute positions over a partly filled cache, and cross-attention."""
  s = 10
  q, k, v = _qkv(t, s, seed=2)
  filled = 6 + t
  kv_seg = jnp.asarray((np.arange(s)[None] < np.array([[filled], [filled]])).astype(np.int32))
  kv_seg = kv_seg.at[1, 0].set(0)  # a left-padded row
  qpos = jnp.broadcast_to(jnp.arange(6, 6 + t), (B, t))
  decode = AttentionMask(q_segment_ids=jnp.ones((B, t), jnp.int32), kv_segment_ids=kv_seg,
                         q_positions=qpos, kv_positions=jnp.broadcast_to(jnp.arange(s), (B, s)),
                         causal=True)
  cross = AttentionMask.build(q_len=t, kv_len=s, kv_padding=kv_seg.astype(bool))
  for mask in (decode, cross):
    out = chunked_attention(q, k, v, mask, query_chunk=2, key_chunk=3)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, mask), atol=1e-5)


def test_layer_equals_xla_layer():
  def layer(impl):
    cfg = ModelConfig.from_dict({
        'd_model': 32, 'max_length': 16, 'position': {'kind': 'alibi'},
        'attention': {'kind': 'dot_product', 'impl': impl, 'num_heads': 4, 'num_kv_heads': 2,
                      'logit_softcap': 5.0,
                      'options': {'query_chunk': 4, 'key_chunk': 8} if impl == 'chunked' else {}}})
    return Attention(cfg, causal=True, rngs=nnx.Rngs(0))

  x = jax.random.normal(jax.random.key(0), (B, 13, 32))
  bias = alibi_bias(jnp.arange(13)[None], jnp.arange(13)[None], num_heads=4)
  out = layer('chunked')(x, AttentionMask(), bias=bias)[0]
  np.testing.assert_allclose(out, layer('xla')(x, AttentionMask(), bias=bias)[0], atol=1e-5)


@pytest.mark.parametrize('feature', ['weights', 'shaw', 'dropout'])
def test_refused_features_name_the_reason(feature):
  cfg = AttentionConfig(kind='dot_product', impl='chunked')
  with pytest.raises(ConfigError, match=feature):
    registry.require(cfg, {feature})


def test_forward_backward_memory_is_subquadratic():
  """temp bytes of jit(grad) at n = 2048, chunks of 256: far below the dense core's."""
  n = 2048
  spec = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)
  mask = AttentionMask(causal=True)

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask)), argnums=(0, 1, 2)))
    return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  dense = temp_bytes(dot_product_attention)
  chunked = temp_bytes(lambda *a: chunked_attention(*a, query_chunk=256, key_chunk=256))
  assert dense >= n * n * 4
  assert chunked < dense / 8
  assert chunked < n * n * 4 / 4
