"""Perceiver (CATALOG B15): shapes, latent depth at a cost independent of the input length,
padding invariance, permutation invariance without positions, weight sharing, jit == eager."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.models import build_model, family

V, LABELS, ATOL = 30, 5, 1e-5


def make(inputs='tokens', num_layers=1, seed=0, perceiver=None, **kw):
  p = dict(num_latents=8, inputs=inputs, fourier_bands=4)
  p.update(perceiver or {})
  kw.setdefault('position', dict(kind='learned', max_length=512))
  cfg = family('perceiver', vocab_size=V, d_model=32, num_layers=num_layers,
               attention=dict(num_heads=4), ffn=dict(hidden_dim=64), num_labels=LABELS,
               max_length=512, image_size=8, patch_size=2, perceiver=p, **kw)
  return build_model(cfg, seed=seed)


def tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def flops(model, x):
  graphdef, state = nnx.split(model)
  lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits).lower(state, x)
  return lowered.cost_analysis()['flops']


def test_shapes_for_tokens_and_pixels():
  out = make()(tokens(3, 12))
  chex.assert_shape(out.logits, (3, LABELS))
  chex.assert_shape(out.hidden, (3, 8, 32))
  chex.assert_shape(out.pooled, (3, 32))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  out = make('pixels')(images)
  chex.assert_shape(out.logits, (2, LABELS))
  chex.assert_tree_all_finite(out.logits)


def test_latent_depth_costs_the_same_for_every_input_length():
  """Compiled FLOPs f_L(T) are affine in T (the cross-attention and the embedding grow linearly,
  nothing quadratically), and f_3 - f_1 (two more latent layers) does not depend on T.
  Unrolled layers: XLA's cost analysis counts a scanned loop body once."""
  lengths = (64, 128, 256, 512)
  one = make(num_layers=1, scan_layers=False)
  three = make(num_layers=3, scan_layers=False)
  f1 = [flops(one, jnp.zeros((2, n), jnp.int32)) for n in lengths]
  f3 = [flops(three, jnp.zeros((2, n), jnp.int32)) for n in lengths]
  extra = [b - a for a, b in zip(f1, f3)]
  assert extra[0] > 0 and all(e == extra[0] for e in extra), extra
  slopes = [(f1[i + 1] - f1[i]) / (lengths[i + 1] - lengths[i]) for i in range(3)]
  assert slopes[0] > 0 and all(s == slopes[0] for s in slopes), slopes


def test_padded_content_and_padded_length_do_not_change_the_logits():
  model = make()
  x = tokens(2, 16)
  seg = jnp.array([[1] * 10 + [0] * 6, [1] * 16], jnp.int32)
  out = model(x, segment_ids=seg).logits
  y = x.at[0, 10:].set((x[0, 10:] + 7) % V)
  chex.assert_trees_all_close(model(y, segment_ids=seg).logits, out, atol=0.0, rtol=0.0)
  longer = jnp.concatenate([x, tokens(2, 8, seed=5)], 1)
  seg_long = jnp.concatenate([seg, jnp.zeros((2, 8), jnp.int32)], 1)
  chex.assert_trees_all_close(model(longer, segment_ids=seg_long).logits, out, atol=ATOL)
  # Real tokens do matter.
  z = x.at[0, :10].set((x[0, :10] + 7) % V)
  assert float(jnp.abs(model(z, segment_ids=seg).logits - out)[0].max()) > 1e-5


def test_permutation_invariant_without_positions():
  model = make(position=dict(kind='none'))
  x = tokens(2, 12)
  perm = jax.random.permutation(jax.random.key(3), 12)
  chex.assert_trees_all_close(model(x[:, perm]).logits, model(x).logits, atol=ATOL)


def test_shared_repeats_reuse_weights():
  def count(m):
    return sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))

  shared2 = make(perceiver=dict(num_repeats=2))
  shared4 = make(perceiver=dict(num_repeats=4))
  unshared4 = make(perceiver=dict(num_repeats=4, share_weights=False))
  assert count(shared2) == count(shared4) < count(unshared4)
  x = tokens(2, 12)
  assert float(jnp.abs(shared2(x).logits - shared4(x).logits).max()) > 1e-6


def test_jit_equals_eager():
  for model, x in ((make(perceiver=dict(num_repeats=2)), tokens(2, 12)),
                   (make('pixels'), jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))):
    eager = model(x).logits
    jitted = nnx.jit(lambda m, x: m(x).logits)(model, x)
    chex.assert_trees_all_close(jitted, eager, atol=ATOL)


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match='model.perceiver.inputs'):
    make('audio')
  with pytest.raises(ConfigError, match='model.perceiver.num_latents'):
    make(perceiver=dict(num_latents=0))
  with pytest.raises(ConfigError, match='model.position.kind'):
    make(position=dict(kind='rope'))
