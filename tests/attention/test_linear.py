"""B6: linear attention (elu + 1) against its RNN recurrence and the explicit formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import AttentionMask, registry
from jaxformer.attention.linear import LinearAttention
from jaxformer.config import AttentionConfig, ConfigError

B, T, N, K, H = 2, 11, 4, 2, 8
SEGMENTS = np.array([[1] * 8 + [0] * 3, [1, 1, 2, 2, 2, 2, 3, 3, 3, 0, 0]], np.int32)


def _core(chunk=3):
  cfg = AttentionConfig(kind='linear', options={'chunk_size': chunk})
  return LinearAttention(cfg, num_heads=N, num_kv_heads=K, head_dim=H)


def _qkv(t=T, s=T, seed=0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(B, t, N, H)).astype(np.float32),
          r.normal(size=(B, s, K, H)).astype(np.float32),
          r.normal(size=(B, s, K, H)).astype(np.float32))


def _phi(x):
  return np.where(x > 0, x + 1.0, np.exp(x))


def recurrence(q, k, v, seg):
  """Causal form as an RNN, token by token in float64: S += phi(k) v^T, z += phi(k)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros(q.shape)
  for b in range(B):
    for kh in range(K):
      s, z, current = np.zeros((H, H)), np.zeros(H), None
      for t in range(q.shape[1]):
        if seg[b, t] != 0:
          if seg[b, t] != current:  # a new packed sequence starts from empty sums
            s, z, current = np.zeros((H, H)), np.zeros(H), seg[b, t]
          s += np.outer(_phi(k[b, t, kh]), v[b, t, kh])
          z += _phi(k[b, t, kh])
          for n in range(kh * (N // K), (kh + 1) * (N // K)):
            f = _phi(q[b, t, n])
            out[b, t, n] = f @ s / (f @ z)
  return out


def formula(q, k, v, q_seg, kv_seg):
  """Bidirectional eq. 5: phi(q) sum_s phi(k_s) v_s^T / phi(q) . sum_s phi(k_s), same segment."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = N // K
  fk, vv = np.repeat(_phi(k), g, axis=2), np.repeat(v, g, axis=2)
  a = np.einsum('btnh,bsnh->bnts', _phi(q), fk)
  same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0) \
      & (kv_seg[:, None, :] != 0)
  a = a * same[:, None]
  den = a.sum(-1)
  return np.einsum('bnts,bsnh->btnh', a / np.where(den > 0, den, 1.0)[..., None], vv)


@pytest.mark.parametrize('chunk', [1, 3, 4, 16])
@pytest.mark.parametrize('segments', [False, True])
def test_causal_equals_recurrence(chunk, segments):
  q, k, v = _qkv()
  seg = SEGMENTS if segments else np.ones((B, T), np.int32)
  mask = AttentionMask.build(q_len=T, segment_ids=jnp.asarray(seg) if segments else None,
                             causal=True)
  out = _core(chunk)(q, k, v, mask)
  np.testing.assert_allclose(out, recurrence(q, k, v, seg), atol=1e-5)


@pytest.mark.parametrize('segments', [False, True])
def test_bidirectional_equals_formula(segments):
  q, k, v = _qkv()
  seg = SEGMENTS if segments else np.ones((B, T), np.int32)
  mask = AttentionMask.build(q_len=T, segment_ids=jnp.asarray(seg)) if segments else None
  out = _core(4)(q, k, v, mask)
  np.testing.assert_allclose(out, formula(q, k, v, seg, seg), atol=1e-5)


def test_cross_attention_with_encoder_padding_equals_formula():
  q, k, v = _qkv(t=5, s=9)
  kv_seg = np.ones((B, 9), np.int32)
  kv_seg[1, 6:] = 0
  mask = AttentionMask.build(q_len=5, kv_len=9, kv_padding=jnp.asarray(kv_seg, bool))
  out = _core()(q, k, v, mask)
  np.testing.assert_allclose(out, formula(q, k, v, np.ones((B, 5), np.int32), kv_seg), atol=1e-5)


def test_chunked_gradients_equal_masked_quadratic():
  """Backward pass of the chunked scan against autodiff of the dense masked form."""
  q, k, v = _qkv()
  seg = jnp.asarray(SEGMENTS)
  mask = AttentionMask.build(q_len=T, segment_ids=seg, causal=True)
  allowed = mask.dense(T, T)[:, 0]

  def dense(q, k, v):
    g = N // K
    fq, fk = jax.nn.elu(q) + 1, jnp.repeat(jax.nn.elu(k) + 1, g, axis=2)
    a = jnp.einsum('BTNH,BSNH->BNTS', fq, fk) * allowed[:, None]
    den = a.sum(-1)
    out = jnp.einsum('BNTS,BSNH->BTNH', a / jnp.where(den > 0, den, 1.0)[..., None],
                     jnp.repeat(v, g, axis=2))
    return jnp.sum(jnp.sin(out))

  core = _core(4)
  grads = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v, mask))), (0, 1, 2))(q, k, v)
  for g, ref in zip(grads, jax.grad(dense, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, ref, atol=1e-5)


def test_decoding_with_state_equals_full_causal_forward():
  q, k, v = _qkv()
  core = _core(3)
  full = core(q, k, v, AttentionMask(causal=True))
  state = core.init_state(B, T)
  assert state['s'].shape == (B, K, H, H) and state['s'].dtype == jnp.float32
  outs = []
  for lo, hi in [(0, 5), (5, 6), (6, 7), (7, T)]:
    ones = jnp.ones((B, hi - lo), jnp.int32)
    step = AttentionMask(q_segment_ids=ones, kv_segment_ids=ones, causal=True)
    out, state = core(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], step, state=state)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_padded_tokens_leave_the_state_unchanged():
  q, k, v = _qkv()
  core = _core()
  ones = jnp.ones((B, 4), jnp.int32)
  _, state = core(q[:, :4], k[:, :4], v[:, :4], AttentionMask(q_segment_ids=ones, causal=True),
                  state=core.init_state(B, T))
  pad = jnp.zeros((B, 2), jnp.int32)
  out, after = core(q[:, 4:6], 100 * k[:, 4:6], v[:, 4:6],
                    AttentionMask(q_segment_ids=pad, causal=True), state=state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after, state)
  assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize('feature', ['window', 'bias', 'softcap', 'dropout', 'weights'])
def test_refused_features_name_the_reason(feature):
  with pytest.raises(ConfigError, match=feature):
    registry.require(AttentionConfig(kind='linear'), {feature})
