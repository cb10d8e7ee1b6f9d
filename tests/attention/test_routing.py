"""Routing attention (CATALOG B12): one cluster is full attention, attention stays inside the
routed clusters, and the online k-means centroids follow their EMA update in training only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import AttentionMask, dot_product_attention, registry
from jaxformer.attention.routing import Centroids
from jaxformer.config import AttentionConfig, ConfigError

B, T, N, K, H = 2, 12, 4, 2, 8


def make(num_clusters, **options):
  cfg = AttentionConfig(kind='routing', num_heads=N, num_kv_heads=K,
                        options={'num_clusters': num_clusters, **options})
  return registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0))


def qkv(seed=0):
  a, b, c = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(a, (B, T, N, H)), jax.random.normal(b, (B, T, K, H)),
          jax.random.normal(c, (B, T, K, H)))


def packed_mask(causal):
  """Row 0: two packed segments; row 1: 9 real tokens and 3 padding."""
  seg = jnp.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], jnp.int32)
  return AttentionMask(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)


@pytest.mark.parametrize('causal', [False, True])
def test_one_cluster_equals_full_attention(causal):
  q, k, v = qkv(1)
  mask = packed_mask(causal)
  np.testing.assert_allclose(make(1)(q, k, v, mask), dot_product_attention(q, k, v, mask),
                             atol=1e-5)


def clustered_reference(q, k, v, allowed, iq, ik):
  """float64: for each cluster, softmax over its keys for its queries; mean over clusters."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  kr, vr = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  logits = np.einsum('BTNH,BSNH->BNTS', q, kr) / np.sqrt(H)
  total, count = np.zeros((B, N, T, H)), np.zeros((B, N, T))
  iq, ik = np.asarray(iq), np.asarray(ik)
  for c in range(iq.shape[2]):
    in_q = np.zeros((B, N, T), bool)
    in_k = np.zeros((B, N, T), bool)
    for b in range(B):
      for n in range(N):
        in_q[b, n, iq[b, n, c]] = True
        in_k[b, n, ik[b, n, c]] = True
    ok = allowed & in_q[..., :, None] & in_k[..., None, :]
    masked = np.where(ok, logits, -np.inf)
    m = np.max(masked, -1, keepdims=True)
    e = np.where(ok, np.exp(masked - np.where(np.isfinite(m), m, 0)), 0)
    probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    total += np.einsum('BNTS,BSNH->BNTH', probs, vr) * in_q[..., None]
    count += in_q
  return np.moveaxis(total / np.maximum(count, 1)[..., None], 1, 2)


@pytest.mark.parametrize('causal', [False, True])
def test_attention_stays_within_clusters(causal):
  core = make(3)
  q, k, v = qkv(2)
  mask = packed_mask(causal)
  iq, ik = core.assignments(q, k, mask)
  assert iq.shape == ik.shape == (B, N, 3, 4)
  # Padding is ranked last: with 9 real tokens and 4 slots per cluster, no padded token of
  # row 1 is routed.
  assert np.all(np.asarray(iq[1]) < 9) and np.all(np.asarray(ik[1]) < 9)
  assert len(set(np.asarray(iq[0, 0]).ravel())) > 4  # the clusters differ
  allowed = np.broadcast_to(np.asarray(mask.dense(T, T)), (B, N, T, T))
  out = core(q, k, v, mask)
  np.testing.assert_allclose(out, clustered_reference(q, k, v, allowed, iq, ik), atol=1e-5)
  # Control: routing really removes keys, so the output is not full attention.
  assert np.abs(np.asarray(out) - np.asarray(dot_product_attention(q, k, v, mask))).max() > 1e-2


def test_padding_never_attended_or_routed_ahead_of_real_tokens():
  core = make(2)
  q, k, v = qkv(3)
  mask = packed_mask(False)
  junk = lambda x, seed: x.at[1, 9:].set(100.0 * jax.random.normal(jax.random.key(seed),
                                                                   x[1, 9:].shape))
  out = core(q, k, v, mask)
  np.testing.assert_allclose(core(junk(q, 4), junk(k, 5), junk(v, 6), mask)[1, :9], out[1, :9],
                             atol=1e-5)
  np.testing.assert_array_equal(out[1, 9:], 0.0)
  grads = jax.grad(lambda k, v: jnp.sum(core(q, k, v, mask)[1, :9] ** 2), argnums=(0, 1))(k, v)
  for g in grads:
    assert np.all(np.asarray(g)[1, 9:] == 0.0)


def expected_centroids(core, q, k, mask, decay):
  """float64 EMA: mu_c <- decay mu_c + (1 - decay) mean of the real q^, k^ nearest to mu_c."""
  def norm(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

  qh, kh = norm(q), norm(np.repeat(k, N // K, axis=2))
  mu = np.asarray(core.centroids[...], np.float64)
  new = mu.copy()
  valid = [np.asarray(mask.q_segment_ids) != 0, np.asarray(mask.kv_segment_ids) != 0]
  for n in range(N):
    vecs = np.concatenate([x[:, :, n][ok] for x, ok in zip((qh, kh), valid)])
    nearest = np.argmin(((vecs[:, None] - mu[n][None]) ** 2).sum(-1), axis=1)
    for c in range(mu.shape[1]):
      if np.any(nearest == c):
        new[n, c] = decay * mu[n, c] + (1 - decay) * vecs[nearest == c].mean(0)
  return new


def test_centroids_follow_ema_in_training_and_stay_in_eval():
  core = make(3, decay=0.9)
  q, k, v = qkv(7)
  mask = packed_mask(True)
  before = np.asarray(core.centroids[...])
  expected = expected_centroids(core, q, k, mask, 0.9)
  assert np.abs(expected - before).max() > 1e-3
  core(q, k, v, mask)  # eval: deterministic=True
  np.testing.assert_array_equal(core.centroids[...], before)
  core(q, k, v, mask, deterministic=False)
  np.testing.assert_allclose(core.centroids[...], expected, atol=1e-5)
  # Under nnx.jit the in-place update is carried out of the traced function.
  jitted = make(3, decay=0.9)
  nnx.jit(lambda m, q, k, v: m(q, k, v, mask, deterministic=False))(jitted, q, k, v)
  np.testing.assert_allclose(jitted.centroids[...], expected, atol=1e-5)


def test_centroids_are_state_without_gradient():
  core = make(2)
  assert isinstance(core.centroids, Centroids) and not isinstance(core.centroids, nnx.Param)
  assert not jax.tree.leaves(nnx.state(core, nnx.Param))
  q, k, v = qkv(8)
  grads = jax.grad(lambda q, k, v: jnp.sum(core(q, k, v, packed_mask(True)) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0.0


def test_config_errors_and_refusals():
  with pytest.raises(ConfigError, match='num_clusters'):
    make(0)
  with pytest.raises(ConfigError, match='decay'):
    make(2, decay=1.0)
  with pytest.raises(ConfigError, match='decode'):
    registry.require(AttentionConfig(kind='routing'), {'decode'})
  # A causal layer cannot route with C > 1: later tokens would change earlier outputs.
  cfg = AttentionConfig(kind='routing', num_heads=N, num_kv_heads=K, options={'num_clusters': 2})
  with pytest.raises(ConfigError, match='num_clusters=2 is invalid for a causal layer'):
    registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0), causal=True)
  registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0), causal=False)
