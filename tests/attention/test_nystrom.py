"""B9 Nystromformer: landmarks = n matches softmax (to the pseudo-inverse's fp32 accuracy), a
float64 reference of the paper's algorithm, error shrinking as landmarks grow, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, dot_product_attention, registry
from jaxformer.attention.nystrom import iterative_pinv
from jaxformer.config import AttentionConfig, ConfigError, ModelConfig

B, N, K, H = 2, 4, 2, 8
EPS32 = float(np.finfo(np.float32).eps)


def build(**options):
  cfg = AttentionConfig(kind='nystrom', options=options)
  return registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0))


def qkv(n, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, n, N, H)), jax.random.normal(ks[1], (B, n, K, H)),
          jax.random.normal(ks[2], (B, n, K, H)))


def softmax64(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def pinv64(a, iterations):
  """The paper's iteration (eq. 13) in float64: Z_0 = A^T / (||A||_1 ||A||_inf)."""
  z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
  eye = np.eye(a.shape[0])
  for _ in range(iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def reference(q, k, v, m, valid, iterations):
  """float64 Nystromformer, one head at a time, with empty landmark segments left out."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n = q.shape[1]
  m = min(m, n)
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    ok = valid[b].astype(bool)
    groups = [[t for t in range(n) if t * m // n == j and ok[t]] for j in range(m)]
    groups = [g for g in groups if g]
    for head in range(N):
      qh, kh, vh = q[b, :, head] / np.sqrt(H), k[b, :, head // (N // K)], v[b, :, head // (N // K)]
      ql = np.stack([qh[g].mean(0) for g in groups])
      kl = np.stack([kh[g].mean(0) for g in groups])
      f = softmax64(qh @ kl.T)
      a = softmax64(ql @ kl.T)
      bk = softmax64(np.where(ok[None], ql @ kh.T, -np.inf))
      head_out = f @ pinv64(a, iterations) @ (bk @ (vh * ok[:, None]))
      out[b, :, head] = np.where(ok[:, None], head_out, 0.0)
  return out


def test_iterative_pinv_converges_to_the_pseudo_inverse():
  r = np.random.default_rng(0)
  a = softmax64(r.normal(size=(6, 6)) + 3 * np.eye(6))  # a softmax matrix, cond ~ 3
  np.testing.assert_allclose(iterative_pinv(jnp.asarray(a, jnp.float32), 20), np.linalg.pinv(a),
                             atol=1e-5)
  # Dropped landmarks are zero rows / columns; the iteration keeps them at zero in Z = A^+.
  a[:, 2] = 0.0
  a[4, :] = 0.0
  z = iterative_pinv(jnp.asarray(a, jnp.float32), 30)
  np.testing.assert_allclose(z, np.linalg.pinv(a), atol=1e-5)
  assert np.all(np.asarray(z)[2] == 0.0) and np.all(np.asarray(z)[:, 4] == 0.0)


@pytest.mark.parametrize('seed', [0, 1])
def test_landmarks_equal_to_n_match_softmax(seed):
  # With m = n every segment is one token: F = A = B = softmax(s Q K^T) and F A^+ B V = A V. The
  # iterative pseudo-inverse is the only approximation: after it converges (25 iterations here;
  # the default 6 leaves errors ~3e-2) its fp32 error is O(cond(A) eps), so the tolerance is
  # cond(A) * eps32 with cond(A) from the float64 reference (~1e3 for this data, i.e. ~1e-4; the
  # observed error is ~10x smaller). Row 1 is padded: its valid block must match masked softmax.
  n = 16
  q, k, v = qkv(n, seed)
  pad = jnp.array([[1] * n, [1] * 11 + [0] * 5], bool)
  mask = AttentionMask.build(q_len=n, padding=pad)
  out = build(num_landmarks=n, pinv_iterations=25)(q, k, v, mask)
  ref = dot_product_attention(q, k, v, mask)
  q64 = np.asarray(q, np.float64).reshape(B, n, K, N // K, H)
  logits = np.einsum('btkgh,bskh->bkgts', q64, np.asarray(k, np.float64)) / np.sqrt(H)
  cond = max(np.linalg.cond(softmax64(logits[0])).max(),
             np.linalg.cond(softmax64(logits[1][..., :11, :11])).max())
  assert cond < 1e4  # the tolerance below stays meaningful
  np.testing.assert_allclose(out, ref, atol=cond * EPS32)
  assert not np.allclose(build(num_landmarks=n)(q, k, v, mask), ref, atol=cond * EPS32)


@pytest.mark.parametrize('n, m', [(10, 4), (5, 8), (12, 3)])
def test_matches_float64_reference_with_uneven_segments_and_padding(n, m):
  # n not divisible by m (segments of 2 and 3 tokens), n < m (one token each), and padding that
  # empties the last segment of row 1: the core equals the paper's algorithm run in float64.
  q, k, v = qkv(n, seed=3)
  valid = np.ones((B, n), np.int32)
  valid[1, n - max(2, n // m + 1):] = 0
  mask = AttentionMask.build(q_len=n, padding=jnp.asarray(valid, bool))
  out = build(num_landmarks=m)(q, k, v, mask)
  np.testing.assert_allclose(out, reference(q, k, v, m, valid, 6), atol=1e-5)


def smooth(key, shape, freqs=3):
  """Sums of low-frequency sinusoids along the sequence axis."""
  b, n, h, d = shape
  k1, k2 = jax.random.split(key)
  c = jax.random.normal(k1, (b, freqs, 1, h, d))
  phase = 2 * np.pi * jax.random.uniform(k2, (b, freqs, 1, h, d))
  f = jnp.arange(1, freqs + 1)[None, :, None, None, None]
  t = (jnp.arange(n) / n)[None, None, :, None, None]
  return jnp.sum(c * jnp.sin(2 * np.pi * f * t + phase), axis=1)


@pytest.mark.parametrize('iterations', [6, 12])
def test_error_shrinks_as_landmarks_grow(iterations):
  n = 64
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = smooth(ks[0], (B, n, N, H)), smooth(ks[1], (B, n, K, H)), smooth(ks[2], (B, n, K, H))
  ref = dot_product_attention(q, k, v)
  err = [float(jnp.linalg.norm(build(num_landmarks=m, pinv_iterations=iterations)(
      q, k, v, AttentionMask()) - ref) / jnp.linalg.norm(ref)) for m in (4, 16, 64)]
  assert err[0] > err[1] > err[2], err
  assert err[2] < 0.02, err


def test_conv_skip_is_a_depthwise_convolution_of_masked_values():
  n, c = 7, 3
  q, k, v = qkv(n, seed=5)
  valid = np.array([[1] * n, [1] * 5 + [0] * 2], np.int32)
  mask = AttentionMask.build(q_len=n, padding=jnp.asarray(valid, bool))
  core = build(num_landmarks=3, conv_kernel=c)
  w = np.asarray(core.conv[...], np.float64)  # [c, N]
  skip = np.asarray(core(q, k, v, mask)) - np.asarray(build(num_landmarks=3)(q, k, v, mask))
  vm = np.asarray(v, np.float64) * valid[:, :, None, None]
  ref = np.zeros((B, n, N, H))
  for head in range(N):
    for t in range(n):
      for i in range(c):
        s = t + i - c // 2
        if 0 <= s < n:
          ref[:, t, head] += w[i, head] * vm[:, s, head // (N // K)]
  ref *= valid[:, :, None, None]
  np.testing.assert_allclose(skip, ref, atol=1e-5)


def model_cfg(**options):
  return ModelConfig.from_dict({'d_model': 32, 'max_length': 8, 'attention': {
      'kind': 'nystrom', 'num_heads': 4, 'options': {'num_landmarks': 4, **options}}})


def test_causal_cross_and_decode_are_refused_with_the_reason():
  with pytest.raises(ConfigError, match='see future tokens'):
    Attention(model_cfg(), causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='later decoder tokens'):
    Attention(model_cfg(), cross=True, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='incremental cache'):
    Attention(model_cfg(), rngs=nnx.Rngs(0)).init_cache(1, 8)


def test_bad_options_name_the_field():
  with pytest.raises(ConfigError, match='conv_kernel=4'):
    build(conv_kernel=4)
  with pytest.raises(ConfigError, match='num_landmarks'):
    build(num_landmarks=0)
