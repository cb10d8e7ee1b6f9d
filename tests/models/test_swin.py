"""Swin (CATALOG D9): windowed attention equals dense attention over the whole map with a
same-window (block-diagonal) mask; shifted windows equal dense attention over the *unrolled* map
with the windows displaced by the shift (the paper's naive partition, no roll, no region ids);
every dot_product impl that takes bias and segments gives the xla result; refusals name the
field. Hugging Face parity is in tests/interop/test_hf_swin_parity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError
from jaxformer.models import build_model, family
from jaxformer.models.swin import SwinBlock, stage_config


def swin(**kw):
  base = dict(d_model=16, image_size=16, patch_size=2, num_labels=3,
              attention=dict(num_heads=2), swin=dict(depths=(2, 2), window_size=2))
  for k, v in kw.items():
    base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return family('swin', **base)


def dense_reference(block: SwinBlock, h):
  """The block's attention over all R^2 patches at once: patch i sees patch j iff both lie in
  one window of the partition displaced by the shift o (windows start at rows / columns
  o + k w; the rows below o form a window of their own), plus the relative position bias of
  their true offset. o = 0 is the block-diagonal (same window) mask."""
  r, w, o = block.resolution, block.window, block.shift
  y, x = np.divmod(np.arange(r * r), r)
  n = r // w + 1
  group = ((y - o) // w + 1) * n + (x - o) // w + 2   # >= 1: segment ids
  same = group[:, None] == group[None, :]
  dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
  assert np.all((np.abs(dy) < w) & (np.abs(dx) < w) | ~same)  # visible offsets fit the table
  idx = (np.clip(dy + w - 1, 0, 2 * w - 2) * (2 * w - 1) + np.clip(dx + w - 1, 0, 2 * w - 2))
  bias = jnp.einsum('TSN->NTS', block.relative_bias[...][idx])[None]
  seg = jnp.broadcast_to(jnp.asarray(group, jnp.int32), (h.shape[0], r * r))
  out, _ = block.attn(h, AttentionMask(q_segment_ids=seg, kv_segment_ids=seg), bias=bias)
  return out


@pytest.mark.parametrize('r, w, o', [(8, 4, 0), (8, 4, 2),
                                     pytest.param(6, 3, 1, marks=pytest.mark.slow),
                                     pytest.param(8, 2, 1, marks=pytest.mark.slow)])
def test_windowed_attention_equals_masked_dense_attention(r, w, o):
  cfg = stage_config(swin(), 0)
  block = SwinBlock(cfg, resolution=r, window=w, shift=o, rngs=nnx.Rngs(0))
  block.relative_bias[...] = jax.random.normal(jax.random.key(1), block.relative_bias.shape)
  h = jax.random.normal(jax.random.key(2), (2, r * r, cfg.d_model))
  ours = nnx.jit(lambda b, h: b.window_attention(h))(block, h)
  np.testing.assert_allclose(ours, nnx.jit(dense_reference)(block, h), atol=1e-5, rtol=1e-5)
  if o:  # the mask matters: rolled windows without it mix regions and differ
    plain = SwinBlock(cfg, resolution=r, window=w, shift=0, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(block))

    def rolled_unmasked(plain, h):
      g = jnp.roll(h.reshape(2, r, r, -1), (-o, -o), (1, 2)).reshape(h.shape)
      return jnp.roll(plain.window_attention(g).reshape(2, r, r, -1), (o, o), (1, 2))
    rolled = nnx.jit(rolled_unmasked)(plain, h).reshape(h.shape)
    assert float(jnp.max(jnp.abs(rolled - ours))) > 1e-3


def test_stages_shift_every_second_block_and_never_a_single_window():
  cfg = swin(image_size=16, patch_size=2, num_layers=5, swin=dict(depths=(2, 3), window_size=4))
  model = nnx.eval_shape(lambda: build_model(cfg))
  shifts = [[(b.resolution, b.window, b.shift) for b in s.blocks] for s in model.stages]
  assert shifts == [[(8, 4, 0), (8, 4, 2)], [(4, 4, 0)] * 3]


@pytest.mark.parametrize('impl, options', [
    ('chunked', {'query_chunk': 2, 'key_chunk': 2}),
    pytest.param('cudnn', {'implementation': 'xla'}, marks=pytest.mark.slow)])
def test_attention_impls_give_the_xla_model(impl, options):
  # One stage: a 4 x 4 map, plain then shifted 2 x 2 windows.
  cfg = swin(image_size=8, num_layers=2, swin=dict(depths=(2,)))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  forward = nnx.jit(lambda m, x: m(x).logits)
  ref = forward(build_model(cfg), images)
  out = forward(build_model(cfg.replace(attention=dataclasses.replace(
      cfg.attention, impl=impl, options=FrozenDict(options)))), images)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pallas_interpret_gives_the_xla_model():
  cfg = swin()
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ref = build_model(cfg)(images).logits
  opts = {'block_q': 8, 'block_k': 8, 'block_q_bwd': 8, 'block_k_bwd': 8, 'interpret': True}
  other = build_model(cfg.replace(attention=dataclasses.replace(
      cfg.attention, impl='pallas', options=FrozenDict(opts))))
  np.testing.assert_allclose(other(images).logits, ref, atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_images_and_every_parameter_is_named():
  cfg = swin(drop_path=0.5)
  model = nnx.eval_shape(lambda: build_model(cfg))
  assert model.stages[0].blocks[0].attn_sub.drop_path.rate == 0.0
  assert model.stages[1].blocks[1].attn_sub.drop_path.rate == 0.5
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = v.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(v.get_value().shape), (path, names)


@pytest.mark.parametrize('over, field', [
    (dict(attention=dict(kind='performer')), r"model.attention.kind='performer'.*dot_product"),
    (dict(attention=dict(impl='ring')), r"model.attention.impl='ring'.*\['xla', 'chunked'"),
    (dict(position=dict(kind='rope')), r"model.position.kind='rope'.*'none'"),
    (dict(attention=dict(num_kv_heads=1)), 'model.attention.num_kv_heads'),
    (dict(num_layers=3), r'model.num_layers=3.*sum\(model.swin.depths=\(2, 2\)\) = 4'),
    (dict(swin=dict(num_heads=(2,))), 'model.swin.num_heads'),
    (dict(image_size=12, swin=dict(window_size=4)),
     r'model.image_size=12.*stage 0 has a 6 x 6 patch map.*multiple of its window \(4\)'),
    (dict(image_size=12, num_layers=6, swin=dict(depths=(2, 2, 2), window_size=3)),
     r'stage 1 has a 3 x 3 patch map.*before patch merging, even'),
    (dict(scan_layers=True), 'model.scan_layers.*runs its own layers'),
    (dict(remat='full'), "model.remat.*must be 'none'"),
    (dict(pooler=True), 'model.pooler.*average-pools'),
])
def test_refusals_name_the_field(over, field):
  with pytest.raises(ConfigError, match=field):
    swin(**over)


def test_depths_from_a_list_become_a_tuple():
  cfg = swin(swin=dict(depths=[1, 1]), num_layers=2)
  assert cfg.swin.depths == (1, 1) and hash(cfg)
