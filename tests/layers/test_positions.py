"""C1-C6: position encodings against their formulas and the Hugging Face references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer.attention import dot_product_attention
from jaxformer.config import PositionConfig
from jaxformer.layers import positions as P


# ------------------------------------------------------------------ C1
def test_sinusoidal_formula():
  length, d = 50, 16
  ref = np.zeros((length, d))
  for pos in range(length):
    for i in range(d // 2):
      ref[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
      ref[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
  np.testing.assert_allclose(P.sinusoidal_table(length, d), ref, atol=1e-5)
  split = P.sinusoidal_table(length, d, interleaved=False)
  np.testing.assert_allclose(split, np.concatenate([ref[:, 0::2], ref[:, 1::2]], -1), atol=1e-5)
  np.testing.assert_allclose(P.sinusoidal(jnp.array([[3, 7]]), d)[0], ref[[3, 7]], atol=1e-6)


# ------------------------------------------------------------------ C2
def test_learned_positions_lookup_and_limit():
  m = P.LearnedPositions(8, 4, offset=2, rngs=nnx.Rngs(0))
  assert m.table.shape == (10, 4)
  np.testing.assert_array_equal(m(jnp.array([[0, 5]])), m.table[...][None, [2, 7]])
  with pytest.raises(ValueError, match='model.position.max_length=8'):
    m(jnp.arange(9)[None])
  with pytest.raises(ValueError, match='model.position.max_length'):
    m(jnp.array([[-1]]))
  out = jax.jit(lambda p: m(p))(jnp.array([[7, 8, -1]]))  # unchecked under jit: NaN, no clamp
  assert np.isfinite(out[0, 0]).all() and np.isnan(out[0, 1:]).all()


# ------------------------------------------------------------------ C3
def test_shaw_matches_numpy():
  b, t, n, h, kmax = 2, 7, 2, 4, 2
  r = np.random.default_rng(0)
  q, k, v = (r.normal(size=(b, t, n, h)).astype(np.float32) for _ in range(3))
  shaw = P.ShawRelative(kmax, h, rngs=nnx.Rngs(1), init=nnx.initializers.normal(1.0))
  pos = jnp.arange(t)[None]
  index = shaw.index(pos, pos)
  scale = h ** -0.5
  out = dot_product_attention(
      q, k, v, bias=scale * shaw.key_logits(jnp.asarray(q), index),
      value_bias_fn=lambda p: shaw.value_term(p, index))

  wk, wv = (np.asarray(w[...], np.float64) for w in (shaw.key_table, shaw.value_table))
  ref = np.zeros((b, t, n, h))
  for bi in range(b):
    for hd in range(n):
      for i in range(t):
        a = [wk[np.clip(j - i, -kmax, kmax) + kmax] for j in range(t)]
        e = np.array([q[bi, i, hd] @ (k[bi, j, hd] + a[j]) for j in range(t)]) * scale
        alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        ref[bi, i, hd] = sum(alpha[j] * (v[bi, j, hd] + wv[np.clip(j - i, -kmax, kmax) + kmax])
                             for j in range(t))
  np.testing.assert_allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------ C4
def _t5_bucket_transcription(rel, bidirectional, num_buckets, max_distance):
  """The formula of Raffel et al. / mesh-tensorflow, written out per scalar."""
  out = []
  for n in rel:
    ret, nb = 0, num_buckets
    if bidirectional:
      nb //= 2
      if n > 0:
        ret += nb
      n = abs(n)
    else:
      n = max(-n, 0)
    max_exact = nb // 2
    if n < max_exact:
      ret += n
    else:
      val = max_exact + int(np.float32(np.log(np.float32(n) / max_exact)) /
                            np.float32(math.log(max_distance / max_exact)) * (nb - max_exact))
      ret += min(val, nb - 1)
    out.append(ret)
  return np.array(out)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 40)])
def test_t5_buckets(bidirectional, num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-300, 301)
  ours = np.asarray(P.relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance))
  hf = T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, hf)
  np.testing.assert_array_equal(
      ours, _t5_bucket_transcription(rel, bidirectional, num_buckets, max_distance))
  assert ours.min() == 0 and ours.max() == num_buckets - 1


def test_t5_bias_module():
  m = P.T5RelativeBias(32, 128, 3, True, rngs=nnx.Rngs(0))
  qp, kp = jnp.arange(4)[None] + 10, jnp.arange(6)[None]
  bias = m(qp, kp)
  assert bias.shape == (1, 3, 4, 6)
  bucket = P.relative_position_bucket(kp[:, None, :] - qp[:, :, None])
  np.testing.assert_array_equal(bias[0, 2], np.asarray(m.embedding[...])[np.asarray(bucket[0]), 2])


# ------------------------------------------------------------------ C5
def _rope(x, pos, **kw):
  return P.apply_rope(jnp.asarray(x)[None, None, None], jnp.array([[pos]]),
                      PositionConfig(**kw))[0, 0, 0]


@pytest.mark.parametrize('kw', [
    {}, {'rope_theta': 500.0}, {'rotary_fraction': 0.5},
    {'rope_scaling': 'linear', 'rope_scaling_factor': 4.0},
    {'rope_scaling': 'ntk', 'rope_scaling_factor': 8.0}])
def test_rope_dot_depends_only_on_offset(kw):
  r = np.random.default_rng(0)
  q, k = r.normal(size=16).astype(np.float32), r.normal(size=16).astype(np.float32)
  for delta in (0, 3, 11):
    dots = [float(_rope(q, m + delta, **kw) @ _rope(k, m, **kw)) for m in (0, 5, 40)]
    np.testing.assert_allclose(dots, dots[0], atol=1e-4)
  far = float(_rope(q, 9, **kw) @ _rope(k, 0, **kw))
  assert abs(far - float(q @ k)) > 1e-3  # the rotation does act


def test_rope_partial_leaves_tail_and_matches_hf_layout():
  from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
  r = np.random.default_rng(1)
  x = r.normal(size=(2, 5, 3, 16)).astype(np.float32)
  pos = jnp.asarray(r.integers(0, 100, size=(2, 5)))
  half = P.apply_rope(x, pos, PositionConfig(rotary_fraction=0.5))
  np.testing.assert_array_equal(half[..., 8:], x[..., 8:])
  np.testing.assert_allclose(half[..., :8], P.apply_rope(x[..., :8], pos, PositionConfig()),
                             atol=1e-6)
  # Hugging Face LLaMA: cos/sin [B, T, H] from cat(freqs, freqs), linear scaling = pos / factor.
  cfg = PositionConfig(rope_theta=500.0, rope_scaling='linear', rope_scaling_factor=2.0)
  inv = 1.0 / 500.0 ** (np.arange(0, 16, 2) / 16) / 2.0
  ang = np.asarray(pos)[..., None] * inv
  emb = torch.tensor(np.concatenate([ang, ang], -1), dtype=torch.float32)
  xt = torch.tensor(x).transpose(1, 2)  # HF uses [B, N, T, H]
  hf, _ = apply_rotary_pos_emb(xt, xt, emb.cos(), emb.sin())
  np.testing.assert_allclose(P.apply_rope(x, pos, cfg), hf.transpose(1, 2).numpy(), atol=2e-5)


def test_ntk_scaling_stretches_the_lowest_frequency_by_the_factor():
  d, factor = 32, 8.0
  plain = np.asarray(P.rope_frequencies(d, 10000.0))
  ntk = np.asarray(P.rope_frequencies(d, 10000.0, scaling='ntk', factor=factor))
  np.testing.assert_allclose(ntk[0], plain[0])           # highest frequency kept
  np.testing.assert_allclose(ntk[-1], plain[-1] / factor, rtol=1e-5)  # lowest one interpolated
  np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, d, 2) / d), rtol=1e-6)


# ------------------------------------------------------------------ C6
def test_alibi_slopes_eight_heads():
  np.testing.assert_allclose(P.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(P.alibi_slopes(16)[:2], [2 ** -0.5, 2 ** -1])


@pytest.mark.parametrize('heads', [6, 12, 4])
def test_alibi_slopes_match_bloom(heads):
  from transformers.models.bloom.modeling_bloom import build_alibi_tensor
  alibi = build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)  # slope_n * key position
  np.testing.assert_allclose(P.alibi_slopes(heads), alibi[:, 0, 1].numpy(), rtol=1e-6)


def test_alibi_bias_equals_bloom_under_causal_softmax():
  from transformers.models.bloom.modeling_bloom import build_alibi_tensor
  n, t = 6, 7
  pos = jnp.arange(t)[None]
  ours = np.asarray(P.alibi_bias(pos, pos, n))[0]
  np.testing.assert_allclose(ours[:, 5, 2], -P.alibi_slopes(n) * 3, rtol=1e-6)
  np.testing.assert_allclose(ours[:, 2, 5], ours[:, 5, 2])
  bloom = build_alibi_tensor(torch.ones(1, t), n, torch.float32).numpy()  # [N, 1, S]
  causal = np.tril(np.ones((t, t), bool))
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  np.testing.assert_allclose(softmax(np.where(causal, ours, -np.inf)),
                             softmax(np.where(causal, bloom, -np.inf)), atol=1e-6)
