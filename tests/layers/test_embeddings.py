"""Embeddings and heads (CATALOG D6): lookup, tied/untied heads, range checks, scaling, init."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import Embed, Head, TokenTypeEmbed, make_embed, make_head

V, D = 50, 16


def _ids(seed=0, shape=(2, 7)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def test_lookup_returns_table_rows():
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  ids = _ids()
  out = emb(ids)
  chex.assert_shape(out, (2, 7, D))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(emb.embedding[...])[np.asarray(ids)])


def test_tied_head_is_x_times_embedding_transpose():
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(2, 3, D))
  ref = x @ np.asarray(emb.embedding[...], np.float64).T
  chex.assert_trees_all_close(emb.attend(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('bad', [V, V + 3, -1])
def test_out_of_range_ids_raise_naming_the_vocab(bad):
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  ids = np.zeros((2, 4), np.int32)
  ids[1, 2] = bad
  with pytest.raises(ValueError, match=rf'\[0, {V}\)'):
    emb(jnp.asarray(ids))


def test_out_of_range_ids_under_jit_give_nan_not_a_clipped_row():
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  out = np.asarray(nnx.jit(lambda m, i: m(i))(emb, jnp.asarray([[1, V, -1]])))
  np.testing.assert_array_equal(out[0, 0], np.asarray(emb.embedding[...])[1])
  assert np.isnan(out[0, 1:]).all()


def test_embed_scale_by_sqrt_d_applies_to_lookup_not_to_tied_head():
  cfg = ModelConfig(vocab_size=V, d_model=D)
  plain = make_embed(cfg, rngs=nnx.Rngs(0))
  scaled = make_embed(cfg.replace(embed_scale=True), rngs=nnx.Rngs(0))
  ids = _ids()
  chex.assert_trees_all_close(scaled(ids), plain(ids) * math.sqrt(D), rtol=1e-6)
  x = jnp.ones((1, D))
  chex.assert_trees_all_close(scaled.attend(x), plain.attend(x), rtol=1e-6)


def test_normal_init_std_and_xavier():
  emb = Embed(2048, 64, rngs=nnx.Rngs(0), init_std=0.02)
  table = np.asarray(emb.embedding[...])
  np.testing.assert_allclose(table.std(), 0.02, rtol=0.02)
  assert abs(table.mean()) < 1e-3
  xav = Embed(2048, 64, rngs=nnx.Rngs(0), init='xavier')
  limit = math.sqrt(6 / (2048 + 64))
  w = np.abs(np.asarray(xav.embedding[...]))
  assert w.max() <= limit and w.max() > 0.95 * limit


def test_untied_head_and_logical_axes():
  head = Head(D, V, bias=True, rngs=nnx.Rngs(0))
  head.bias[...] = jnp.arange(V, dtype=jnp.float32)
  x = np.random.default_rng(2).normal(size=(2, 3, D))
  ref = x @ np.asarray(head.kernel[...], np.float64) + np.arange(V)
  chex.assert_trees_all_close(head(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)
  assert head.kernel.get_metadata()['out_sharding'] == ('embed', 'vocab')
  assert head.bias.get_metadata()['out_sharding'] == ('vocab',)
  assert Head(D, V, rngs=nnx.Rngs(0)).bias is None
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  assert emb.embedding.get_metadata()['out_sharding'] == ('vocab', 'embed')
  cfg = ModelConfig(vocab_size=V, d_model=D, head_bias=True)
  assert make_head(cfg, rngs=nnx.Rngs(0)).kernel.shape == (D, V)


def test_token_type_embed_and_compute_dtype():
  tt = TokenTypeEmbed(2, D, rngs=nnx.Rngs(0), ids_name='token_type_ids')
  assert isinstance(tt, Embed)
  with pytest.raises(ValueError, match='token_type_ids'):
    tt(jnp.asarray([[0, 2]]))
  emb = make_embed(ModelConfig(vocab_size=V, d_model=D, dtype='bfloat16'), rngs=nnx.Rngs(0))
  assert emb(_ids()).dtype == jnp.bfloat16 and emb.embedding.dtype == jnp.float32


def test_lookup_under_jit_matches_eager():
  emb = Embed(V, D, rngs=nnx.Rngs(0))
  ids = _ids(3)
  chex.assert_trees_all_close(nnx.jit(lambda m, i: m(i))(emb, ids), emb(ids))
  grads = nnx.grad(lambda m: jnp.sum(m.attend(m(ids))))(emb)
  chex.assert_tree_all_finite(jax.tree.leaves(grads))
