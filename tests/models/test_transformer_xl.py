"""Transformer-XL (CATALOG B14): relative shift == the paper's formula gathered explicitly,
segment recurrence == the masked forward over the concatenation, causality through gradients,
padding and packing, decoding with the memory as the cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.layers import positions as pos_lib
from jaxformer.models import build_model, family
from jaxformer.models import transformer_xl as txl

V = 40
ATOL = 1e-5


def make(memory_length=8, num_layers=2, seed=0, **kw):
  cfg = family('transformer_xl', vocab_size=V, d_model=32, num_layers=num_layers,
               attention=dict(num_heads=4, num_kv_heads=2), ffn=dict(hidden_dim=64),
               memory_length=memory_length, max_length=128, **kw)
  return build_model(cfg, seed=seed)


def tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def test_relative_shift_equals_explicit_gather_of_the_formula():
  model = make(memory_length=3)
  attn = model.layers[0].attn
  b, m, t, d = 2, 3, 5, 32
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  mem = jax.random.normal(jax.random.key(1), (b, m, d))
  kv = jnp.concatenate([mem, x], 1)
  got = attn.logits(x, kv)                                            # [B, N, T, S]
  # The formula term by term, with R_{i-j} gathered at the explicit distance M + i - j.
  q = jnp.einsum('BTD,DNH->BTNH', x, attn.wq[...])
  k = jnp.repeat(jnp.einsum('BSD,DKH->BSKH', kv, attn.wk[...]), 2, axis=2)
  dist = m + jnp.arange(t)[:, None] - jnp.arange(m + t)[None, :]    # [T, S]
  r = jnp.einsum('TSD,DNH->TSNH', pos_lib.sinusoidal(dist, d, interleaved=False), attn.wr[...])
  u, v = attn.u[...], attn.v[...]
  a = jnp.einsum('BTNH,BSNH->BNTS', q, k)
  bb = jnp.einsum('BTNH,TSNH->BNTS', q, r)
  c = jnp.einsum('NH,BSNH->BNS', u, k)[:, :, None, :]
  dd = jnp.einsum('NH,TSNH->NTS', v, r)[None]
  want = attn.scale * (a + bb + c + dd)
  valid = np.asarray(dist >= 0)
  np.testing.assert_allclose(np.asarray(got)[..., valid], np.asarray(want)[..., valid],
                             atol=ATOL, rtol=1e-5)


def test_rel_shift_never_builds_more_than_t_by_s_plus_one():
  t, s = 4, 7
  jaxpr = jax.make_jaxpr(txl.rel_shift)(jnp.zeros((2, 3, t, s)))
  sizes = [np.prod(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) <= 2 * 3 * t * (s + 1)


@pytest.mark.parametrize('num_layers', [1, 3])
def test_two_segments_with_memory_equal_the_full_causal_forward(num_layers):
  """M >= T: segment 2 sees all of segment 1 at every layer, which is exactly causal attention."""
  model = make(memory_length=8, num_layers=num_layers)
  x = tokens(2, 12)
  full = model(x).logits
  first = model(x[:, :6])
  second = model(x[:, 6:], memory=first.cache)
  chex.assert_trees_all_close(jnp.concatenate([first.logits, second.logits], 1), full,
                              atol=ATOL)


def test_three_segments_memory_of_two_segments_equal_the_full_forward():
  model = make(memory_length=8, num_layers=2)
  x = tokens(2, 12)
  full = model(x).logits
  outs, mem = [], None
  for i in range(3):
    o = model(x[:, 4 * i:4 * i + 4], memory=mem)
    outs.append(o.logits)
    mem = o.cache
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=ATOL)


def test_one_layer_memory_of_one_segment_equals_the_forward_over_the_window():
  """L = 1, M = T: segment 3 sees segment 2 and itself only: the forward over [seg2; seg3]."""
  model = make(memory_length=4, num_layers=1)
  x = tokens(2, 12)
  mem = None
  for i in range(3):
    o = model(x[:, 4 * i:4 * i + 4], memory=mem)
    mem = o.cache
  window = model(x[:, 4:]).logits[:, 4:]
  chex.assert_trees_all_close(o.logits, window, atol=ATOL)


def test_receptive_field_grows_with_depth():
  """M = T: with one layer segment 3 ignores segment 1; with two layers it depends on it (the
  memory of layer 2 was computed from segment 1), as the paper's O(N L) context."""
  def last_segment(model, x):
    mem = None
    for i in range(3):
      o = model(x[:, 4 * i:4 * i + 4], memory=mem)
      mem = o.cache
    return o.logits

  x = tokens(1, 12)
  x2 = x.at[:, :4].set((x[:, :4] + 1) % V)
  one, two = make(memory_length=4, num_layers=1), make(memory_length=4, num_layers=2)
  chex.assert_trees_all_close(last_segment(one, x), last_segment(one, x2), atol=0.0, rtol=0.0)
  assert float(jnp.abs(last_segment(two, x) - last_segment(two, x2)).max()) > 1e-4


def test_scanned_segments_equal_the_loop_of_calls_and_jit():
  model = make(memory_length=4, num_layers=2)
  x = tokens(2, 12)
  scanned = model(x, segment_length=4)
  mem, outs = None, []
  for i in range(3):
    o = model(x[:, 4 * i:4 * i + 4], memory=mem)
    outs.append(o.logits)
    mem = o.cache
  chex.assert_trees_all_close(scanned.logits, jnp.concatenate(outs, 1), atol=ATOL)
  chex.assert_trees_all_close(scanned.cache, mem, atol=ATOL)
  jitted = nnx.jit(lambda m, t: m(t, segment_length=4).logits)(model, x)
  chex.assert_trees_all_close(jitted, scanned.logits, atol=ATOL)


def test_token_by_token_decoding_with_memory_equals_the_full_forward():
  model = make(memory_length=10, num_layers=2)
  x = tokens(2, 9)
  full = model(x).logits
  step = jax.jit(lambda t, mem: model(t, memory=mem))
  mem, outs = model.init_memory(2), []
  for i in range(9):
    o = step(x[:, i:i + 1], mem)
    outs.append(o.logits)
    mem = o.cache
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=ATOL)


def test_causal_through_gradients_and_no_gradient_into_memory():
  model = make(memory_length=4, num_layers=2)
  b, t, d = 1, 6, 32
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  seg = jnp.ones((b, t), jnp.int32)
  mem = dict(model.init_memory(b), segment_ids=jnp.ones((b, 4), jnp.int32))
  mem['hidden'] = jax.random.normal(jax.random.key(1), mem['hidden'].shape)
  jac = jax.jacrev(lambda x: model.run_segment(x, mem, seg)[0].sum(-1))(x)  # [B, T, B, T, D]
  norms = jnp.abs(jac[0, :, 0]).sum(-1)                                      # [T out, T in]
  future = np.triu(np.ones((t, t), bool), 1)
  assert float(jnp.where(future, norms, 0.0).max()) == 0.0
  assert float(jnp.where(future, jnp.inf, norms).min()) > 0.0
  g_mem = jax.grad(lambda h: model.run_segment(x, dict(mem, hidden=h), seg)[1]['hidden'].sum())(
      mem['hidden'])
  assert float(jnp.abs(g_mem).max()) == 0.0


def test_padding_and_packed_documents_are_isolated():
  model = make(memory_length=6, num_layers=2)
  x = tokens(2, 12)
  seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], jnp.int32)
  out = model(x, segment_ids=seg, segment_length=6).logits
  # Padding content and the other document do not change a document's logits.
  y = x.at[0, 10:].set(0).at[0, :5].set((x[0, :5] + 3) % V)
  out2 = model(y, segment_ids=seg, segment_length=6).logits
  chex.assert_trees_all_close(out2[0, 5:10], out[0, 5:10], atol=ATOL)
  # Document 2 alone (its own memory chain) gives the same logits.
  alone = model(x[:1, 5:10]).logits
  chex.assert_trees_all_close(out[0, 5:10], alone[0], atol=ATOL)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_config_refuses_absolute_positions_and_bad_lengths():
  with pytest.raises(ConfigError, match='model.position.kind'):
    family('transformer_xl', position=dict(kind='rope'))
  with pytest.raises(ConfigError, match='model.memory_length'):
    family('transformer_xl', memory_length=-1)
  model = make()
  with pytest.raises(ValueError, match='segment length'):
    model(tokens(1, 10), segment_length=4)
