"""Reformer's reversible layers and chunked FFN (CATALOG B10), and the 'reformer' family.

Oracles: the inputs of a reversible stack are reconstructed exactly from its outputs; its custom
VJP (which recomputes every layer from the top) gives the gradients of ordinary autodiff through
the same network; one reversible layer is (x + TransformerBlock(x)) / 2 by algebra
(Y1 = x + F(x), Y2 = x + G(Y1), block(x) = Y1 + G(Y1)); the chunked FFN equals the FFN.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers.ffn import FeedForward
from jaxformer.models import build_model, family, reversible
from jaxformer.models.stack import Stack

B, T, D = 2, 16, 32
# init_std 0.1 makes every branch change the streams by O(0.1-1) while activations stay O(1): in
# fp32 the reconstruction error is about eps * |activations| times the layers' Lipschitz
# constants, so much larger weights (activations ~20) would reach ~1e-5 by conditioning alone.


def config(kind='dot_product', position='none', **kw):
  options = {'n_buckets': 4, 'n_hashes': 2, 'chunk_size': 4} if kind == 'lsh' else {}
  return ModelConfig.from_dict(dict(dict(
      d_model=D, num_layers=3, max_length=T, init_std=0.1, reversible=True,
      position={'kind': position},
      attention={'kind': kind, 'num_heads': 4, 'num_kv_heads': 2, 'options': options}), **kw))


def padded_mask(causal=True):
  seg = jnp.array([[1] * T, [1] * (T // 2) + [2] * (T // 4) + [0] * (T // 4)], jnp.int32)
  return AttentionMask(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)


def streams(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, T, D)), jax.random.normal(k2, (B, T, D))


@pytest.mark.parametrize('kind, scan', [('dot_product', True), ('lsh', True), ('lsh', False)])
def test_inputs_are_reconstructed_from_outputs(kind, scan):
  stack = Stack(config(kind), 3, causal=True, rngs=nnx.Rngs(0))
  x1, x2 = streams()
  mask = padded_mask()
  (y1, y2), _ = reversible.forward_streams(stack.layers, x1, x2, mask, scan=scan)
  assert float(jnp.abs(y1 - x1).mean()) > 0.1 and float(jnp.abs(y2 - x2).mean()) > 0.1
  r1, r2 = reversible.reconstruct(stack.layers, y1, y2, mask, scan=scan)
  np.testing.assert_allclose(r1, x1, atol=1e-5)
  np.testing.assert_allclose(r2, x2, atol=1e-5)


@pytest.mark.parametrize('kind, position, scan', [('dot_product', 't5', True),
                                                  ('lsh', 'none', True),
                                                  ('lsh', 'none', False)])
def test_custom_vjp_equals_ordinary_autodiff(kind, position, scan):
  cfg = config(kind, position, scan_layers=scan)
  stack = Stack(cfg, 3, causal=True, rngs=nnx.Rngs(1))
  x, w = streams(1)
  mask = padded_mask()
  qpos = jnp.arange(T)[None]

  def ours(stack, x):  # Stack.__call__: the reversible path with the memory-saving VJP
    return stack(x, mask)[0]

  def plain(stack, x):  # the same network differentiated by ordinary autodiff
    return reversible.reversible_stack(stack.layers, x, mask, bias=stack.bias(qpos, qpos),
                                       scan=scan, custom_vjp=False)[0]

  def grads(fn):
    loss = lambda stack, x: jnp.sum(w * fn(stack, x))
    return nnx.jit(nnx.grad(loss, argnums=(0, 1)))(stack, x)

  np.testing.assert_allclose(ours(stack, x), plain(stack, x), atol=1e-6)
  (gs1, gx1), (gs0, gx0) = grads(ours), grads(plain)
  np.testing.assert_allclose(gx1, gx0, atol=1e-5)
  leaves1, leaves0 = jax.tree.leaves(nnx.state(gs1)), jax.tree.leaves(nnx.state(gs0))
  assert len(leaves1) == len(leaves0) > 10
  if position == 't5':  # the stack-level bias gets its gradient through the custom VJP
    assert float(jnp.abs(nnx.state(gs1)['position_bias']['embedding'][...]).max()) > 0
  for a, b in zip(leaves1, leaves0):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_reversible_layer_is_the_mean_of_input_and_block():
  cfg = config(num_layers=1)
  rev = Stack(cfg, 1, causal=True, rngs=nnx.Rngs(2))
  std = Stack(cfg.replace(reversible=False), 1, causal=True, rngs=nnx.Rngs(2))
  x, _ = streams(2)
  mask = padded_mask()
  np.testing.assert_allclose(rev(x, mask)[0], (x + std(x, mask)[0]) / 2, atol=1e-5)


@pytest.mark.parametrize('gated', [False, True])
def test_chunked_ffn_equals_ffn(gated):
  cfg = ModelConfig.from_dict({'d_model': D, 'init_std': 0.3, 'ffn': {'gated': gated}})
  ffn = FeedForward(cfg, rngs=nnx.Rngs(3))
  chunked = FeedForward(cfg.replace(ffn=dataclasses.replace(cfg.ffn, chunk_size=3)),
                        rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(3), (B, 10, D))  # 10 = 3 + 3 + 3 + 1: a padded chunk
  w = jax.random.normal(jax.random.key(4), (B, 10, D))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(chunked, x), ffn(x), atol=1e-5)
  grad = lambda m: nnx.jit(nnx.grad(lambda m, x: jnp.sum(w * m(x)), argnums=(0, 1)))(m, x)
  (gm1, gx1), (gm0, gx0) = grad(chunked), grad(ffn)
  np.testing.assert_allclose(gx1, gx0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(gm1)), jax.tree.leaves(nnx.state(gm0))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_ffn_dropout_draws_a_new_mask_per_chunk():
  cfg = ModelConfig.from_dict({'d_model': D, 'ffn': {'dropout': 0.5, 'chunk_size': 2}})
  ffn = FeedForward(cfg, rngs=nnx.Rngs(0))
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(5), (1, 1, D)), (1, 4, D))
  same = nnx.jit(lambda m, x: m(x))(ffn, x)
  np.testing.assert_allclose(same[0, 2], same[0, 0], atol=1e-6)
  dropped = nnx.jit(lambda m, x: m(x, deterministic=False))(ffn, x)
  assert float(jnp.abs(dropped[0, 2] - dropped[0, 0]).max()) > 1e-3  # chunks 0 and 1 differ


def reformer(**kw):
  return family('reformer', vocab_size=64, d_model=D, num_layers=2, max_length=T,
                attention={'num_heads': 2, 'options': {'n_buckets': 4, 'chunk_size': 4}},
                ffn={'chunk_size': 4}, **kw)


def test_reformer_family_gradients_match_ordinary_autodiff(monkeypatch):
  cfg = reformer()
  assert cfg.reversible and cfg.attention.kind == 'lsh' and cfg.ffn.chunk_size == 4
  model = build_model(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (B, T), 1, 64)
  seg = padded_mask().q_segment_ids

  def loss(model):
    return jnp.mean(model(tokens, segment_ids=seg).logits ** 2)

  l1, g1 = nnx.jit(nnx.value_and_grad(loss))(model)
  monkeypatch.setattr(reversible, 'reversible_stack',
                      functools.partial(reversible.reversible_stack, custom_vjp=False))
  l0, g0 = nnx.jit(nnx.value_and_grad(loss))(model)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g0))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  unrolled = build_model(cfg.replace(scan_layers=False), seed=0)
  np.testing.assert_allclose(unrolled(tokens, segment_ids=seg).logits,
                             model(tokens, segment_ids=seg).logits, atol=1e-5)


def test_reversible_decoder_decodes_with_a_kv_cache():
  cfg = config(num_layers=2, family='decoder', vocab_size=64, position='learned')
  model = build_model(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(6), (B, 8), 0, 64)
  full = model(tokens).logits
  cache = model.init_cache(B, 8)
  out = model(tokens[:, :3], positions=jnp.broadcast_to(jnp.arange(3), (B, 3)), cache=cache)
  logits, cache = [out.logits], out.cache
  for i in range(3, 8):
    out = model(tokens[:, i:i + 1], positions=jnp.full((B, 1), i), cache=cache)
    logits.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(logits, 1), full, atol=1e-5)


def test_backward_memory_does_not_grow_with_depth():
  """Compiled temporaries of the gradient: flat in depth with the custom VJP, growing without."""

  def temp(layers, custom_vjp):
    cfg = config(num_layers=layers, init_std=0.02)
    graphdef, params, rest = nnx.split(Stack(cfg, layers, causal=True, rngs=nnx.Rngs(0)),
                                       nnx.Param, ...)
    x = jax.ShapeDtypeStruct((B, 128, D), jnp.float32)

    def loss(params, x):
      stack = nnx.merge(graphdef, params, rest)
      return jnp.sum(reversible.reversible_stack(stack.layers, x, AttentionMask(causal=True),
                                                 custom_vjp=custom_vjp)[0] ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes

  rev2, rev8 = temp(2, True), temp(8, True)
  plain2, plain8 = temp(2, False), temp(8, False)
  assert plain8 - plain2 > 3 * B * 128 * D * 4 * 6  # ordinary autodiff stores every layer
  assert rev8 - rev2 < (plain8 - plain2) / 4


@pytest.mark.parametrize('change, field', [
    (dict(norm_position='post'), 'model.norm_position'),
    (dict(moe={'num_experts': 2}), 'model.moe.num_experts'),
    (dict(residual_dropout=0.1), 'model.residual_dropout'),
    (dict(attention={'dropout': 0.1}), 'model.attention.dropout'),
    (dict(family='encoder_decoder'), 'model.family'),
    (dict(ffn={'chunk_size': 0}), 'model.ffn.chunk_size'),
])
def test_invalid_reversible_settings_name_the_field(change, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    family('reformer', **change)
