"""Conformer (CATALOG D7, E8; models/conformer.py, layers/conv.py).

The convolution module against a numpy reference (np.correlate per channel, per packed segment);
the causal convolution's gradient is exactly zero towards later inputs; the block equals its
equation (macaron halves) computed from its own sub-modules; the families' shapes, packing,
scan == unrolled, cached decoding == full forward, an efficient attention kind inside the block,
and the refusals at config time.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError
from jaxformer.inference import decode
from jaxformer.layers.conv import ConvModule
from jaxformer.models import build_model, family
from jaxformer.models.conformer import ConformerBlock

T = 8


@nnx.jit
def run(model, toks, segment_ids):
  """One compiled forward per config (rows of T tokens), shared by the tests."""
  return model(toks, segment_ids=segment_ids)


def tokens(seed, b=3):
  return jax.random.randint(jax.random.key(seed), (b, T), 1, 37)


ONES = jnp.ones((3, T), jnp.int32)


def tiny(name='conformer', **kw):
  kw.setdefault('conformer', dict(kernel_size=3))
  return family(name, vocab_size=37, d_model=16, num_layers=2, max_length=16,
                attention=kw.pop('attention', dict(num_heads=2)),
                ffn=dict(activation='silu', hidden_dim=32), **kw)


def conv_module(k, causal, seed=0):
  cfg = tiny('conformer', conformer=dict(kernel_size=k, causal=causal))
  module = ConvModule(cfg, causal=causal, rngs=nnx.Rngs(seed))
  # Non-zero biases and norm parameters, so that the reference checks where each one goes.
  for i, (_, v) in enumerate(sorted(nnx.iter_graph(module), key=lambda kv: str(kv[0]))):
    if isinstance(v, nnx.Param):
      v.set_value(jax.random.normal(jax.random.key(100 + i), v.shape) * 0.5)
  return module


def numpy_conv_module(module, x, seg, k, causal):
  """The conv module on each packed segment on its own, with np.correlate per channel."""
  p = {n: np.asarray(getattr(module, n)[...], np.float64)
       for n in ('w_in', 'b_in', 'w_dw', 'b_dw', 'w_out', 'b_out')}
  scale = np.asarray(module.norm.scale[...], np.float64)
  bias = np.asarray(module.norm.bias[...], np.float64)
  x = np.asarray(x, np.float64)
  a = np.einsum('btd,dgc->btgc', x, p['w_in']) + p['b_in']
  u = a[..., 0, :] / (1 + np.exp(-a[..., 1, :]))
  left = k - 1 if causal else (k - 1) // 2
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for s in set(seg[b].tolist()) - {0}:
      idx = np.nonzero(seg[b] == s)[0]
      us = np.pad(u[b, idx], ((left, k - 1 - left), (0, 0)))
      v = np.stack([np.correlate(us[:, c], p['w_dw'][:, c], mode='valid')
                    for c in range(us.shape[1])], axis=1) + p['b_dw']
      mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
      h = (v - mean) / np.sqrt(var + 1e-5) * scale + bias
      h = h / (1 + np.exp(-h))
      y[b, idx] = h @ p['w_out'] + p['b_out']
  return y


@pytest.mark.parametrize('k, causal', [(3, True), pytest.param(4, True, marks=pytest.mark.slow), (3, False)])
def test_conv_module_matches_numpy_reference_per_segment(k, causal):
  module = conv_module(k, causal)
  x = jax.random.normal(jax.random.key(1), (3, T, 16))
  seg = np.array([[1] * T, [1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
  # With segment ids, and without (one example per row).
  y, y_none = nnx.jit(lambda m, x, s: (m(x, s)[0], m(x)[0]))(module, x, jnp.asarray(seg))
  want = numpy_conv_module(module, x, seg, k, causal)
  valid = seg != 0
  np.testing.assert_allclose(np.asarray(y)[valid], want[valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(y_none)[0], want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k, causal', [(4, True), (3, False)])
def test_conv_receptive_field_by_gradient(k, causal):
  """d y_t / d x_s is exactly zero outside the kernel's window: for the causal conv every
  s > t (and s <= t - k), for the centred one |s - t| > (k - 1) / 2; and non-zero inside it."""
  module = conv_module(k, causal)
  x = jax.random.normal(jax.random.key(2), (1, T, 16))
  jac = nnx.jit(lambda m, x: jax.jacrev(lambda x: m(x)[0][0])(x))(module, x)  # [T, D, 1, T, D]
  reach = np.asarray(jnp.abs(jac).sum(axis=(1, 2, 4)))  # [t, s]
  t, s = np.meshgrid(np.arange(T), np.arange(T), indexing='ij')
  inside = (s <= t) & (s > t - k) if causal else np.abs(s - t) <= (k - 1) // 2
  assert np.all(reach[~inside] == 0.0), reach
  assert np.all(reach[inside] > 0.0), reach


def test_block_is_its_equation_with_macaron_halves():
  """y = LN(x3 + FFN2(LN(x3)) / 2), x3 = x2 + Conv(LN(x2)), x2 = x1 + MHSA(LN(x1)),
  x1 = x + FFN1(LN(x)) / 2, from the block's own sub-modules (the weights 1/2 are the
  paper's; the formula with 1 in place of either 1/2 differs, so the check can fail)."""
  block = build_model(tiny(num_labels=5)).stack._first_group().blocks[0]  # pylint: disable=protected-access
  assert isinstance(block, ConformerBlock)
  x = jax.random.normal(jax.random.key(3), (2, T, 16))
  mask = AttentionMask(q_positions=jnp.arange(T)[None], kv_positions=jnp.arange(T)[None])

  def formula(block, w1, w2):
    x1 = x + w1 * block.ffn1(block.ffn1_sub.norm(x))
    x2 = x1 + block.self_attn(block.attn_sub.norm(x1), mask)[0]
    x3 = x2 + block.conv(block.conv_sub.norm(x2))[0]
    return block.out_norm(x3 + w2 * block.ffn2(block.ffn2_sub.norm(x3)))

  @nnx.jit
  def check(block):
    y, _, aux = block(x, mask)
    assert aux == {}
    return y, [formula(block, *w) for w in ((0.5, 0.5), (1.0, 0.5), (0.5, 1.0))]

  y, (half, ffn1_whole, ffn2_whole) = check(block)
  chex.assert_trees_all_close(y, half, atol=1e-5)
  # Each FFN branch matters, so a weight other than 1/2 on either would have been caught.
  assert float(jnp.abs(ffn1_whole - half).max()) > 1e-3
  assert float(jnp.abs(ffn2_whole - half).max()) > 1e-3


def test_shapes_of_both_families():
  toks = tokens(4)
  out = run(build_model(tiny(num_labels=5)), toks, ONES)
  chex.assert_shape(out.logits, (3, 5))
  chex.assert_shape(out.hidden, (3, T, 16))
  chex.assert_shape(run(build_model(tiny('conformer_lm')), toks, ONES).logits, (3, T, 37))


@pytest.mark.slow
def test_scan_equals_unrolled():
  toks = tokens(4)
  cfg = tiny('conformer_lm')
  chex.assert_trees_all_close(run(build_model(cfg.replace(scan_layers=False)), toks, ONES),
                              run(build_model(cfg), toks, ONES), atol=1e-5)


def lm_is_causal(model):
  toks = tokens(5)
  full = run(model, toks, ONES).logits
  changed = run(model, toks.at[:, 5:].set((toks[:, 5:] + 7) % 37), ONES).logits
  np.testing.assert_array_equal(np.asarray(changed[:, :5]), np.asarray(full[:, :5]))
  assert float(jnp.abs(changed[:, 5:] - full[:, 5:]).max()) > 1e-4


def test_lm_is_causal_end_to_end():
  lm_is_causal(build_model(tiny('conformer_lm'), seed=1))


def packing_holds(model):
  """Two examples packed in one row give the hidden states each gives alone (padded rows)."""
  a, b = tokens(6, 1)[:, :5], tokens(7, 1)[:, :3]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, T - x.shape[1])))  # noqa: E731
  toks = jnp.concatenate([jnp.concatenate([a, b], 1), pad(a), pad(b)])
  seg = jnp.array([[1] * 5 + [2] * 3, [1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
  h = run(model, toks, seg).hidden
  chex.assert_trees_all_close(h[0, :5], h[1, :5], atol=1e-5)
  chex.assert_trees_all_close(h[0, 5:], h[2, :3], atol=1e-5)


@pytest.mark.parametrize('name', ['conformer', 'conformer_lm'])
def test_packed_examples_equal_separate_rows(name):
  """Packing and padding keep examples apart in the convolution as in the attention."""
  packing_holds(build_model(tiny(name, num_labels=5 if name == 'conformer' else 0), seed=2))


def test_cached_decoding_equals_full_forward():
  model = build_model(tiny('conformer_lm'), seed=3)
  toks = tokens(8)
  full = run(model, toks, ONES).logits
  step = nnx.jit(lambda m, x, p, c: m(x, positions=p, cache=c))
  pos = jnp.broadcast_to(jnp.arange(T)[None], (3, T))
  # Two tokens per call: each call's conv reads the state and its own new inputs (one token
  # per call is `generate`'s case, tested with -m slow below).
  steps, cache = [], model.init_cache(3, T)
  for t in range(0, T, 2):
    out = step(model, toks[:, t:t + 2], pos[:, t:t + 2], cache)
    steps.append(out.logits)
    cache = out.cache
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.slow
def test_greedy_generation_of_left_padded_prompts():
  """`generate` (left-padded prompts of different lengths, cached) is greedy decoding: each
  new token is the argmax of a full forward over the prompt and the tokens before it."""
  model = build_model(tiny('conformer_lm'), seed=3)
  prompts = [[5, 9, 11, 2], [7, 3]]
  gen = np.asarray(decode.generate(model, prompts, max_new_tokens=3).tokens)
  for p, row in zip(prompts, gen):
    seq = jnp.asarray([list(p) + list(row[:3])])
    want = np.asarray(jnp.argmax(model(seq).logits[0, len(p) - 1:len(p) + 2], -1))
    np.testing.assert_array_equal(row[:3], want)


@pytest.mark.parametrize('name', [pytest.param('conformer', marks=pytest.mark.slow),
                                  'conformer_lm'])
def test_linear_attention_in_the_block(name):
  """An efficient kind inside the block: packing holds (and the LM stays causal); a kind that
  lacks a needed feature (Shaw relative positions) is refused when the model is built."""
  attention = dict(kind='linear', num_heads=2)
  model = build_model(tiny(name, attention=attention), seed=4)
  packing_holds(model)
  if name == 'conformer_lm':
    lm_is_causal(model)
  with pytest.raises(ConfigError, match='shaw'):
    build_model(tiny(name, attention=attention, position=dict(kind='shaw')))


@pytest.mark.parametrize('overrides, match', [
    (dict(conformer=dict(norm='batchnorm')), r"model.conformer.norm='batchnorm'.*running stat"),
    (dict(conformer=dict(norm='rmsnorm')), r"model.conformer.norm='rmsnorm'.*\['layernorm'\]"),
    (dict(family='conformer_lm', conformer=dict(causal=False)),
     r'model.conformer.causal=False.*causal'),
    (dict(conformer=dict(kernel_size=4)), r'model.conformer.kernel_size=4.*odd'),
    (dict(conformer=dict(kernel_size=0)), r'model.conformer.kernel_size=0'),
    (dict(norm_position='post'), r"model.norm_position='post'.*'pre'"),
    (dict(moe=dict(num_experts=2)), r'model.moe.num_experts=2'),
    (dict(reversible=True), r'model.reversible=True.*four residual branches'),
])
def test_refused_at_config_time(overrides, match):
  with pytest.raises(ConfigError, match=match):
    family('conformer', **overrides)


def test_causal_conv_in_the_encoder_is_allowed_and_even_kernels_then_too():
  cfg = family('conformer', conformer=dict(causal=True, kernel_size=4))
  assert cfg.conformer.causal and not cfg.is_causal
