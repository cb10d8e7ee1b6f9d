"""Reformer LSH attention (CATALOG B10) against dense numpy references.

The references attend densely (float64) with the same shared-QK logits and self-mask, masked by
  * the visibility mask alone when there is one bucket, one chunk (C >= n): full attention;
  * the union over rounds of "same bucket" when there are several buckets and one chunk;
  * the union over rounds of "same bucket, same or previous sorted chunk" in general, with the
    chunks rebuilt here by sorting (segment, bucket, index) with numpy.
Equality with the last one also checks the de-duplication of keys seen in several rounds: each
key must count once in the softmax over the union.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, lsh
from jaxformer.config import ConfigError, ModelConfig

B, N, K, H = 2, 4, 2, 8


def inputs(t, seed=0):
  kq, kv = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (B, t, N, H)), jax.random.normal(kv, (B, t, K, H))


def segments(t, kind):
  """None, or [B, T] ids: row 0 all valid, row 1 padded (or packed 1, 2 then padded)."""
  if kind == 'none':
    return None
  row1 = [1] * (t // 2) + [0] * (t - t // 2)
  if kind == 'packed':
    row1 = [1] * (t // 4) + [2] * (t // 4) + [0] * (t - 2 * (t // 4))
  return jnp.array([[1] * t, row1], jnp.int32)


def visible(t, seg, causal):
  """[B, 1, T, T] bool: equal non-zero segments and, if causal, s <= t."""
  s = np.ones((B, t), int) if seg is None else np.asarray(seg)
  m = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] != 0) & (s[:, None, :] != 0)
  if causal:
    m &= np.tril(np.ones((t, t), bool))
  return m[:, None]


def dense_reference(q, v, allowed, self_mask=True):
  """Shared-QK softmax attention masked by `allowed` [B, N|1, T, T]; empty rows give 0."""
  q, v = np.asarray(q, np.float64), np.asarray(v, np.float64)
  t = q.shape[1]
  k = q / np.linalg.norm(q, axis=-1, keepdims=True)
  logits = np.einsum('btnh,bsnh->bnts', q, k) * H ** -0.5
  if self_mask:
    logits[:, :, np.arange(t), np.arange(t)] = lsh.SELF_LOGIT
  allowed = np.broadcast_to(allowed, logits.shape)
  logits = np.where(allowed, logits, -np.inf)
  mx = np.max(logits, axis=-1, keepdims=True)
  p = np.where(allowed, np.exp(logits - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum('bnts,bsnh->btnh', p, np.repeat(v, N // K, axis=2))


def buckets(q, n_buckets, n_hashes, seed=0):
  rot = lsh.random_rotations(seed, H, n_hashes, n_buckets)
  keys = lsh.unit_keys(jnp.asarray(q).transpose(0, 2, 1, 3))
  return np.asarray(lsh.lsh_buckets(keys, rot, n_buckets))  # [B, N, R, T]


def chunk_mask(bk, seg, c):
  """[B, N, T, T]: j in P_r(i) for some round r, rebuilt by sorting (segment, bucket, index)."""
  b, n, r, t = bk.shape
  s = np.ones((b, t), int) if seg is None else np.asarray(seg)
  seg_key = np.where(s == 0, np.iinfo(np.int32).max, s)
  out = np.zeros((b, n, t, t), bool)
  for bi in range(b):
    for ni in range(n):
      for ri in range(r):
        h = bk[bi, ni, ri]
        order = np.lexsort((np.arange(t), h, seg_key[bi]))
        chunk = np.empty(t, int)
        chunk[order] = np.arange(t) // c
        d = chunk[:, None] - chunk[None, :]
        out[bi, ni] |= (h[:, None] == h[None, :]) & ((d == 0) | (d == 1))
  return out


def run(q, v, seg, causal, **opts):
  mask = AttentionMask(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
  return jax.jit(lambda q, v: lsh.lsh_attention(q, v, mask, **opts))(q, v)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('seg_kind', ['none', 'padding', 'packed'])
@pytest.mark.parametrize('n_hashes', [1, 3])
def test_one_bucket_one_chunk_equals_full_shared_qk_attention(causal, seg_kind, n_hashes):
  t = 12
  q, v = inputs(t)
  seg = segments(t, seg_kind)
  out = run(q, v, seg, causal, n_buckets=1, n_hashes=n_hashes, chunk_size=16)
  np.testing.assert_allclose(out, dense_reference(q, v, visible(t, seg, causal)), atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_several_buckets_attend_within_their_buckets(causal):
  t, nb, nh = 16, 4, 2
  q, v = inputs(t, seed=1)
  seg = segments(t, 'padding')
  bk = buckets(q, nb, nh)
  assert len(np.unique(bk)) == nb
  same = (bk[..., :, None] == bk[..., None, :]).any(axis=2)  # [B, N, T, T] union over rounds
  assert not same.all()
  out = run(q, v, seg, causal, n_buckets=nb, n_hashes=nh, chunk_size=t)
  ref = dense_reference(q, v, visible(t, seg, causal) & same)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  full = dense_reference(q, v, visible(t, seg, causal))
  assert np.abs(ref - full).max() > 1e-2  # the bucket mask matters


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('t', [32, 30])
def test_sorted_chunks_equal_dense_with_the_same_chunk_mask(causal, t):
  nb, nh, c = 4, 3, 4
  q, v = inputs(t, seed=2)
  seg = segments(t, 'packed')
  allowed = chunk_mask(buckets(q, nb, nh), seg, c)
  out = run(q, v, seg, causal, n_buckets=nb, n_hashes=nh, chunk_size=c)
  np.testing.assert_allclose(out, dense_reference(q, v, visible(t, seg, causal) & allowed),
                             atol=1e-5)


def test_self_mask_only_when_nothing_else_is_visible():
  t = 8
  q, v = inputs(t)
  out = run(q, v, None, True, n_buckets=1, n_hashes=1, chunk_size=t)
  v0 = np.repeat(np.asarray(v), N // K, axis=2)[:, 0]
  np.testing.assert_allclose(out[:, 0], v0, atol=1e-6)  # only itself: attends to itself
  np.testing.assert_allclose(out[:, 1], v0, atol=1e-6)  # itself and token 0: token 0 only
  free = run(q, v, None, True, n_buckets=1, n_hashes=1, chunk_size=t, self_mask=False)
  ref = dense_reference(q, v, visible(t, None, True), self_mask=False)
  np.testing.assert_allclose(free, ref, atol=1e-5)


def test_padding_rows_are_zero_and_padding_keys_are_ignored():
  t = 16
  q, v = inputs(t)
  seg = segments(t, 'padding')
  opts = dict(n_buckets=4, n_hashes=2, chunk_size=4)
  out = run(q, v, seg, False, **opts)
  np.testing.assert_array_equal(out[1, t // 2:], 0.0)
  junk_q = q.at[1, t // 2:].set(50.0 * jax.random.normal(jax.random.key(9), (t // 2, N, H)))
  junk_v = v.at[1, t // 2:].set(1e3)
  np.testing.assert_allclose(run(junk_q, junk_v, seg, False, **opts)[1, :t // 2],
                             out[1, :t // 2], atol=1e-6)


def test_gradients_match_the_dense_reference():
  t, nb, nh, c = 16, 4, 2, 4
  q, v = inputs(t, seed=3)
  allowed = jnp.asarray(chunk_mask(buckets(q, nb, nh), None, c) & visible(t, None, True))

  def ref(q, v):  # the dense reference in JAX, for autodiff (same buckets: they are constant)
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    logits = jnp.einsum('btnh,bsnh->bnts', q, k) * H ** -0.5
    logits = jnp.where(jnp.eye(t, dtype=bool), lsh.SELF_LOGIT, logits)
    p = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', p, jnp.repeat(v, N // K, axis=2))

  mask = AttentionMask(causal=True)
  ours = lambda q, v: lsh.lsh_attention(q, v, mask, n_buckets=nb, n_hashes=nh, chunk_size=c)
  w = jax.random.normal(jax.random.key(4), (B, t, N, H))
  g1 = jax.grad(lambda q, v: jnp.sum(w * ours(q, v)), argnums=(0, 1))(q, v)
  g0 = jax.grad(lambda q, v: jnp.sum(w * ref(q, v)), argnums=(0, 1))(q, v)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_hash_is_angular_and_matches_the_formula():
  q, _ = inputs(16)
  keys = np.asarray(q).transpose(0, 2, 1, 3)
  rot = np.asarray(lsh.random_rotations(0, H, 2, 8))
  proj = np.einsum('bnth,hrk->bnrtk', keys, rot)
  expected = np.argmax(np.concatenate([proj, -proj], -1), -1)
  np.testing.assert_array_equal(lsh.lsh_buckets(jnp.asarray(keys), jnp.asarray(rot), 8),
                                expected)
  np.testing.assert_array_equal(lsh.lsh_buckets(3.0 * jnp.asarray(keys), jnp.asarray(rot), 8),
                                expected)


def layer(causal=True, **options):
  cfg = ModelConfig.from_dict({'d_model': 32, 'max_length': 16, 'position': {'kind': 'none'},
                               'attention': {'kind': 'lsh', 'num_heads': 4, 'options': options}})
  return Attention(cfg, causal=causal, rngs=nnx.Rngs(0))


def test_decoding_and_cross_attention_are_refused_with_reasons():
  with pytest.raises(ConfigError, match='decode.*chunk boundaries'):
    layer().init_cache(B, 16)
  cfg = ModelConfig.from_dict({'d_model': 32, 'attention': {'kind': 'lsh', 'num_heads': 4}})
  with pytest.raises(ConfigError, match='cross.*shared-QK'):
    Attention(cfg, cross=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name, value', [('n_buckets', 3), ('n_hashes', 0), ('chunk_size', -1)])
def test_bad_options_name_the_field(name, value):
  with pytest.raises(ConfigError, match=f'model.attention.options.{name}'):
    layer(**{name: value})


def test_packed_segments_do_not_see_each_others_contents():
  t = 16
  q, v = inputs(t, seed=5)
  seg = segments(t, 'packed')  # row 1: segment 1 at 0..3, segment 2 at 4..7, padding after
  opts = dict(n_buckets=4, n_hashes=2, chunk_size=4)
  other_q = q.at[1, 4:8].set(jax.random.normal(jax.random.key(7), (4, N, H)))
  other_v = v.at[1, 4:8].set(-v[1, 4:8] + 3.0)
  np.testing.assert_allclose(run(other_q, other_v, seg, True, **opts)[1, :4],
                             run(q, v, seg, True, **opts)[1, :4], atol=1e-6)
