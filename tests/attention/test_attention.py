"""A3, A6, A10: the Attention layer against numpy; KV-cached decoding equals the full pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, set_sow_weights
from jaxformer.config import ModelConfig
from jaxformer.layers import positions as P

D = 32


def make_cfg(heads=4, kv_heads=None, position='none', **attention):
  pos = position if isinstance(position, dict) else {'kind': position}
  return ModelConfig.from_dict({
      'd_model': D, 'position': pos,
      'attention': dict(num_heads=heads, num_kv_heads=kv_heads, **attention)})


def _np(w):
  return None if w is None else np.asarray(w[...], np.float64)


def np_rope(x, pos, theta=10000.0):
  d = x.shape[-1]
  ang = np.asarray(pos, np.float64)[..., None] * theta ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_layer(m, x, kv=None, allowed=None, rope_pos=None):
  """The layer in float64 numpy: projections, optional RoPE, masked softmax, output."""
  x = np.asarray(x, np.float64)
  src = x if kv is None else np.asarray(kv, np.float64)
  add = lambda y, b: y if b is None else y + _np(b)
  q = add(np.einsum('btd,dnh->btnh', x, _np(m.wq)), m.bq)
  k = add(np.einsum('bsd,dnh->bsnh', src, _np(m.wk)), m.bk)
  v = add(np.einsum('bsd,dnh->bsnh', src, _np(m.wv)), m.bv)
  if rope_pos is not None:
    q, k = np_rope(q, rope_pos), np_rope(k, rope_pos)
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(s.shape, bool) if allowed is None else np.broadcast_to(allowed, s.shape)
  e = np.where(allowed, np.exp(s - np.where(allowed, s, -np.inf).max(-1, keepdims=True)), 0)
  p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return add(np.einsum('bnts,bsnh,nhd->btd', p, v, _np(m.wo)), m.bo)


def test_cross_attention_matches_numpy_and_cache():
  cfg = make_cfg(4, 2, qkv_bias=True, out_bias=True)
  m = Attention(cfg, cross=True, rngs=nnx.Rngs(0))
  for b in (m.bq, m.bk, m.bv, m.bo):  # non-zero biases so that they are checked too
    b[...] = jax.random.normal(jax.random.key(7), b.shape)
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 5, D)).astype(np.float32)
  enc = r.normal(size=(2, 7, D)).astype(np.float32)
  enc_pad = np.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  mask = AttentionMask.build(q_len=5, kv_len=7, kv_padding=jnp.asarray(enc_pad))
  y, cache = nnx.jit(lambda m, x, mask, enc: m(x, mask, kv=enc))(m, x, mask, enc)
  assert cache is None
  ref = np_layer(m, x, kv=enc, allowed=enc_pad[:, None, None, :])
  np.testing.assert_allclose(y, ref, atol=1e-5)
  # Cached encoder K/V, then the decoder queries one at a time.
  cache = nnx.jit(lambda m, enc, seg: m.precompute_cross(enc, seg))(
      m, enc, jnp.asarray(enc_pad, jnp.int32))
  assert set(cache) == {'k', 'v', 'segment_ids', 'positions'}
  step = nnx.jit(lambda m, x, cache: m(x, None, cache=cache)[0])
  steps = [step(m, x[:, t:t + 1], cache) for t in range(5)]
  np.testing.assert_allclose(np.concatenate(steps, 1), ref, atol=1e-5)


def test_self_attention_rope_gqa_matches_numpy():
  m = Attention(make_cfg(4, 2, 'rope'), causal=True, rngs=nnx.Rngs(1))
  x = np.random.default_rng(1).normal(size=(2, 6, D)).astype(np.float32)
  y, _ = m(x, AttentionMask())
  causal = np.tril(np.ones((6, 6), bool))
  np.testing.assert_allclose(y, np_layer(m, x, allowed=causal, rope_pos=np.arange(6)[None]),
                             atol=1e-5)


# ------------------------------------------------------------------ KV cache (A6)
def _bias_fn(name, heads):
  if name == 'alibi':
    return functools.partial(P.alibi_bias, num_heads=heads)
  if name == 't5':
    t5 = P.T5RelativeBias(8, 16, heads, False, rngs=nnx.Rngs(3),
                          init=nnx.initializers.normal(1.0))
    return lambda qp, kp: t5(qp, kp)
  return None


CACHE_CASES = {
    'mha_rope': (make_cfg(4, 4, 'rope'), None),
    'gqa_alibi': (make_cfg(4, 2, 'alibi'), 'alibi'),
    'mqa_rope_window': (make_cfg(4, 1, 'rope', window=3), None),
    'gqa_shaw': (make_cfg(4, 2, {'kind': 'shaw', 'shaw_max_relative': 2}), None),
    'gqa_t5': (make_cfg(4, 2, 't5'), 't5'),
    'mqa_qknorm_partial_rope': (
        make_cfg(4, 1, {'kind': 'rope', 'rotary_fraction': 0.5}, qk_norm=True, qkv_bias=True,
                 logit_softcap=3.0), None),
}


def _jitted(m, bias):
  """One compiled call per input shape: eager dispatch would dominate these small tests."""
  return nnx.jit(lambda m, x, mask, cache: m(x, mask, bias=bias, cache=cache))


@pytest.mark.parametrize('case', list(CACHE_CASES))
def test_kv_cache_equals_full_forward(case):
  cfg, bias_name = CACHE_CASES[case]
  m = Attention(cfg, causal=True, rngs=nnx.Rngs(2))
  call = _jitted(m, _bias_fn(bias_name, cfg.num_heads))
  b, t = 2, 8
  x = jax.random.normal(jax.random.key(0), (b, t, D))
  full, _ = call(m, x, AttentionMask(), None)
  # a prompt chunk of 0 (token by token) or 5 tokens, then tokens
  for chunk in (0, 5):
    cache = m.init_cache(b, t)
    outs = []
    if chunk:
      y, cache = call(m, x[:, :chunk], AttentionMask(), cache)
      outs.append(y)
    for i in range(chunk, t):
      y, cache = call(m, x[:, i:i + 1], AttentionMask(), cache)
      outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)
    assert int(cache['index']) == t


@pytest.mark.parametrize('case', ['gqa_rope', 'mha_alibi_window'])
def test_left_padded_batched_prompts(case):
  if case == 'gqa_rope':
    cfg, bias = make_cfg(4, 2, 'rope'), None
  else:
    cfg = make_cfg(4, 4, 'alibi', window=4)
    bias = functools.partial(P.alibi_bias, num_heads=4)
  m = Attention(cfg, causal=True, rngs=nnx.Rngs(4))
  call = _jitted(m, bias)
  lengths, prompt, gen = [5, 3], 5, 3
  seqs = [jax.random.normal(jax.random.key(i), (1, n + gen, D)) for i, n in enumerate(lengths)]
  refs = [call(m, s, AttentionMask(), None)[0][0] for s in seqs]  # each row alone, unpadded
  junk = jax.random.normal(jax.random.key(9), (prompt, D)) * 5
  chunk, seg, pos = [], [], []
  for s, n in zip(seqs, lengths):
    chunk.append(jnp.concatenate([junk[:prompt - n], s[0, :n]]))
    seg.append([0] * (prompt - n) + [1] * n)
    pos.append([0] * (prompt - n) + list(range(n)))
  mask = AttentionMask(q_segment_ids=jnp.array(seg), q_positions=jnp.array(pos))
  cache = m.init_cache(2, prompt + gen)
  y, cache = call(m, jnp.stack(chunk), mask, cache)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(y[row, prompt - n:], refs[row][:n], atol=1e-5)
    np.testing.assert_array_equal(y[row, :prompt - n], 0.0)  # padded queries see nothing
  for i in range(gen):
    tok = jnp.stack([s[0, n + i] for s, n in zip(seqs, lengths)])[:, None]
    step_mask = AttentionMask(q_positions=jnp.array([[n + i] for n in lengths]))
    y, cache = call(m, tok, step_mask, cache)
    for row, n in enumerate(lengths):
      np.testing.assert_allclose(y[row, 0], refs[row][n + i], atol=1e-5)


def test_cache_errors():
  m = Attention(make_cfg(), causal=True, rngs=nnx.Rngs(0))
  cache = m.init_cache(1, 4)
  with pytest.raises(ValueError, match='overflow'):
    m(jnp.zeros((1, 5, D)), AttentionMask(), cache=cache)
  with pytest.raises(ValueError, match='cannot be causal'):
    Attention(make_cfg(), cross=True, causal=True, rngs=nnx.Rngs(0))
  cross = Attention(make_cfg(), cross=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='kv='):
    cross(jnp.zeros((1, 2, D)), AttentionMask())
  with pytest.raises(ValueError, match='precompute_cross'):
    cross.init_cache(1, 4)


# ------------------------------------------------------------------ A10 extras
def test_qk_norm_makes_logits_invariant_to_qk_scale():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))

  def scaled_diff(qk_norm):
    # The invariance is exact only without the epsilon inside the norm.
    cfg = make_cfg(4, 2, 'rope', qk_norm=qk_norm).replace(norm_eps=1e-20)
    m = Attention(cfg, causal=True, rngs=nnx.Rngs(0))
    y, _ = m(x, AttentionMask())
    m.wq[...] = m.wq[...] * 30.0
    m.wk[...] = m.wk[...] * 20.0
    return float(jnp.abs(m(x, AttentionMask())[0] - y).max())

  assert scaled_diff(True) < 1e-5
  assert scaled_diff(False) > 1e-3


@pytest.mark.parametrize('how', ['helper', 'option'])
def test_sow_attention_weights(how):
  options = {'sow_weights': True} if how == 'option' else {}
  m = Attention(make_cfg(4, 2, 'rope', options=options), causal=True, rngs=nnx.Rngs(0))
  if how == 'helper':
    assert set_sow_weights(m, True) == 1
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  pad = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  (y, _), inter = nnx.capture(lambda m, x: m(x, AttentionMask.build(q_len=6, padding=pad)),
                              nnx.Intermediate)(m, x)
  (w,) = inter['core']['attention_weights'].get_value()
  assert w.shape == (2, 4, 6, 6)
  w = np.asarray(w)
  np.testing.assert_allclose(w[0].sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(w[1, :, :4].sum(-1), 1.0, atol=1e-6)
  assert np.all(w[1, :, 4:] == 0) and np.all(w[:, :, np.triu_indices(6, 1)[0],
                                                  np.triu_indices(6, 1)[1]] == 0)
  set_sow_weights(m, False)
  _, inter = nnx.capture(lambda m, x: m(x, AttentionMask()), nnx.Intermediate)(m, x)
  assert 'attention_weights' not in inter.get('core', {})


def test_dropout_in_stacked_scanned_layers():
  cfg = make_cfg(4, 2, 'rope', dropout=0.5)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Attention(cfg, causal=True, rngs=rngs)

  layers = make(nnx.Rngs(params=0, dropout=1))
  # Identical weights in every layer, so that only the dropout masks can tell them apart.
  params = nnx.state(layers, nnx.Param)
  nnx.update(layers, jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), params))
  x = jax.random.normal(jax.random.key(0), (2, 6, D))

  @nnx.jit
  def run(layers, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(c, layer):
      return c, (layer(x, AttentionMask())[0], layer(x, AttentionMask(), deterministic=False)[0])
    return body(0, layers)[1]

  clean, first = run(layers, x)
  _, second = run(layers, x)
  np.testing.assert_allclose(clean[1], clean[0], atol=1e-6)
  np.testing.assert_allclose(clean[2], clean[0], atol=1e-6)
  for i in range(3):
    assert np.abs(first[i] - clean[i]).max() > 1e-3
    assert np.abs(second[i] - first[i]).max() > 1e-3  # the stream advances between calls
    for j in range(i):
      assert np.abs(first[i] - first[j]).max() > 1e-3  # each layer draws its own mask
