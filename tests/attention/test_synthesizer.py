"""Synthesizer attention (CATALOG B11): shapes, masks, gradients, input independence, mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, dot_product_attention, registry
from jaxformer.attention.synthesizer import MODES, FixedSynthesis
from jaxformer.config import AttentionConfig, ConfigError, ModelConfig

B, T, N, K, H, L = 2, 6, 4, 2, 8, 8


def make(mode, max_length=L, **options):
  cfg = AttentionConfig(kind='synthesizer', num_heads=N, num_kv_heads=K,
                        options={'mode': mode, 'factor': 3, **options})
  return registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0),
                        max_length=max_length)


def qkv(seed=0, t=T):
  a, b, c = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(a, (B, t, N, H)), jax.random.normal(b, (B, t, K, H)),
          jax.random.normal(c, (B, t, K, H)))


def reference(core, q, k, v, allowed):
  """float64 numpy: softmax(synthesized (+ scaled dot) logits, masked) V, GQA by repetition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  p = {name: np.asarray(getattr(core, name)[...], np.float64)
       for name in ('w1', 'b1', 'w2', 'b2', 'wa', 'ba', 'r', 'r1', 'r2')
       if getattr(core, name) is not None}
  t, s = q.shape[1], k.shape[1]
  if 'r' in p:
    logits = np.broadcast_to(p['r'][None, :, :t, :s], (q.shape[0], N, t, s))
  elif 'r1' in p:
    logits = np.broadcast_to(np.einsum('NTJ,NSJ->NTS', p['r1'][:, :t], p['r2'][:, :s])[None],
                             (q.shape[0], N, t, s))
  else:
    hidden = np.maximum(np.einsum('BTNH,NHI->BNTI', q, p['w1']) + p['b1'][None, :, None], 0)
    rows = np.einsum('BNTI,NIJ->BNTJ', hidden, p['w2']) + p['b2'][None, :, None]
    if 'wa' in p:  # C[j] = A[j mod a] * B[j div a]
      a_vec = np.einsum('BNTI,NIJ->BNTJ', hidden, p['wa']) + p['ba'][None, :, None]
      j = np.arange(L)
      rows = rows[..., j // core.a] * a_vec[..., j % core.a]
    logits = rows[..., :s]
  kr, vr = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  if core.mode.endswith('+dot'):
    logits = logits + np.einsum('BTNH,BSNH->BNTS', q, kr) / np.sqrt(H)
  logits = np.where(allowed, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  e = np.where(allowed, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
  probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum('BNTS,BSNH->BTNH', probs, vr)


@pytest.mark.parametrize('mode', MODES)
def test_matches_numpy_reference_with_causal_and_padding(mode):
  core = make(mode)
  q, k, v = qkv(1)
  pad = jnp.array([[1] * T, [1] * 4 + [0] * 2], bool)
  mask = AttentionMask.build(q_len=T, padding=pad, causal=True)
  out = core(q, k, v, mask)
  assert out.shape == (B, T, N, H)
  allowed = np.broadcast_to(np.asarray(mask.dense(T, T)), (B, N, T, T))
  np.testing.assert_allclose(out, reference(core, q, k, v, allowed), atol=1e-5)
  np.testing.assert_array_equal(out[1, 4:], 0.0)  # padded queries see nothing


@pytest.mark.parametrize('mode', MODES)
def test_causality_and_padding_through_outputs_and_gradients(mode):
  core = make(mode)
  q, k, v = qkv(2)
  pad = jnp.array([[1] * T, [1] * 4 + [0] * 2], bool)
  mask = AttentionMask.build(q_len=T, padding=pad, causal=True)
  f = lambda q, k, v: core(q, k, v, mask)
  t0 = 2
  junk = lambda x, seed: x.at[:, t0 + 1:].set(jax.random.normal(jax.random.key(seed),
                                                                x[:, t0 + 1:].shape))
  np.testing.assert_allclose(f(junk(q, 3), junk(k, 4), junk(v, 5))[:, :t0 + 1],
                             f(q, k, v)[:, :t0 + 1], atol=1e-6)
  grads = jax.grad(lambda *a: jnp.sum(f(*a)[:, :t0 + 1] ** 2), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.asarray(g)[:, t0 + 1:] == 0.0)
  assert np.abs(np.asarray(grads[2])[:, :t0 + 1]).sum() > 0.0
  # Padding: keys/values at padded slots of row 1 never reach its valid outputs.
  pad_junk = lambda x: x.at[1, 4:].set(100.0)
  np.testing.assert_allclose(f(q, pad_junk(k), pad_junk(v))[1, :4], f(q, k, v)[1, :4],
                             atol=1e-5)
  grads = jax.grad(lambda k, v: jnp.sum(f(q, k, v)[1, :4] ** 2), argnums=(0, 1))(k, v)
  for g in grads:
    assert np.all(np.asarray(g)[1, 4:] == 0.0)


@pytest.mark.parametrize('mode', MODES)
def test_gradients_finite_and_nonzero_for_parameters_in_use(mode):
  core = make(mode)
  q, k, v = qkv(3)
  grads = nnx.grad(lambda m: jnp.sum(m(q, k, v, AttentionMask(causal=True)) ** 2))(core)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  params = jax.tree.leaves(nnx.state(core, nnx.Param))
  assert len(leaves) == len(params) > 0
  for g in leaves:
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0.0


def probabilities(core, q, k, v):
  _, inter = nnx.capture(lambda m: m(q, k, v, AttentionMask(causal=True)), nnx.Intermediate)(core)
  (w,) = inter['attention_weights'].get_value()
  return np.asarray(w)


@pytest.mark.parametrize('mode', ['random', 'factorized_random'])
def test_fixed_random_is_input_independent_and_untrained(mode):
  core = make(mode, trainable=False, sow_weights=True)
  w0, w1 = probabilities(core, *qkv(4)), probabilities(core, *qkv(5))
  np.testing.assert_array_equal(w0, w1)
  # Control: the dense synthesizer's weights do depend on the input.
  dense = make('dense', sow_weights=True)
  assert np.abs(probabilities(dense, *qkv(4)) - probabilities(dense, *qkv(5))).max() > 1e-3
  # The fixed matrices are FixedSynthesis state, not parameters, and get no gradient.
  fixed = jax.tree.leaves(nnx.state(core, FixedSynthesis))
  assert fixed and not jax.tree.leaves(nnx.state(core, nnx.Param))
  q, k, v = qkv(6)
  core.sow_weights = False
  grads = nnx.grad(lambda m: jnp.sum(m(q, k, v, AttentionMask(causal=True)) ** 2))(core)
  assert not jax.tree.leaves(nnx.state(grads, FixedSynthesis))
  trained = make(mode)
  assert not jax.tree.leaves(nnx.state(trained, FixedSynthesis))
  assert jax.tree.leaves(nnx.state(trained, nnx.Param))


@pytest.mark.parametrize('mode', ['dense+dot', 'random+dot'])
def test_mixture_with_zero_synthesizer_equals_dot_product(mode):
  core = make(mode)
  for name in ('w2', 'b2', 'r'):
    if getattr(core, name) is not None:
      getattr(core, name)[...] = jnp.zeros_like(getattr(core, name)[...])
  q, k, v = qkv(7)
  pad = jnp.array([[1] * T, [1] * 4 + [0] * 2], bool)
  mask = AttentionMask.build(q_len=T, padding=pad, causal=True)
  np.testing.assert_allclose(core(q, k, v, mask), dot_product_attention(q, k, v, mask),
                             atol=1e-5)
  # Control: with its initial (nonzero) synthesizer the mixture differs from dot product.
  np.testing.assert_raises(AssertionError, np.testing.assert_allclose, make(mode)(q, k, v, mask),
                           dot_product_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_kv_cache_equals_full_forward(mode):
  cfg = ModelConfig.from_dict({
      'd_model': 32, 'max_length': L, 'position': {'kind': 'none'},
      'attention': {'kind': 'synthesizer', 'num_heads': N, 'num_kv_heads': K,
                    'options': {'mode': mode, 'factor': 3}}})
  layer = Attention(cfg, causal=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(8), (B, L, 32))
  full, _ = layer(x, AttentionMask())
  cache = layer.init_cache(B, L)
  out, cache = layer(x[:, :3], AttentionMask(), cache=cache)
  outs = [out]
  for i in range(3, L):
    out, cache = layer(x[:, i:i + 1], AttentionMask(), cache=cache)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_config_errors_and_refusals():
  with pytest.raises(ConfigError, match='mode'):
    make('bogus')
  with pytest.raises(ConfigError, match='trainable'):
    make('dense', trainable=False)
  with pytest.raises(ConfigError, match='max_length'):
    make('dense', max_length=None)
  with pytest.raises(ConfigError, match='cross'):
    registry.require(AttentionConfig(kind='synthesizer'), {'cross'})
  q, k, v = qkv(9, t=L + 1)
  with pytest.raises(ValueError, match='max_length'):
    make('random')(q, k, v, AttentionMask())
