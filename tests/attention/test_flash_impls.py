"""The fused exact-attention impls 'pallas', 'cudnn' and 'auto' of the 'dot_product' kind.

The kernels' own oracle is tests/kernels/test_flash_attention.py; the generic properties
(causality, padding, jit, remat, KV cache) run for both impls in tests/attention/test_generic.py.
Here: impl resolution, the translation of AttentionMask into cuDNN's arguments (checked on XLA's
implementation of the same `jax.nn.dot_product_attention` call, since CI has no GPU), and
a model trained with impl='pallas' against impl='xla'.
"""

import dataclasses
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError
from jaxformer.models import build_model, family
from jaxformer.train.metrics import read_metrics
from jaxformer.train.trainer import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize('backend,dtype,needed,expected', [
    ('gpu', jnp.bfloat16, {'causal', 'segments'}, 'cudnn'),
    ('gpu', jnp.float16, {'causal', 'bias'}, 'cudnn'),
    ('gpu', jnp.float32, {'causal'}, 'pallas'),           # cuDNN flash is half precision only
    ('gpu', jnp.bfloat16, {'causal', 'softcap'}, 'pallas'),  # cuDNN has no soft cap
    ('gpu', jnp.float32, {'causal', 'bias'}, 'pallas'),
    ('gpu', jnp.bfloat16, {'dropout'}, 'xla'),
    ('tpu', jnp.bfloat16, {'causal', 'window'}, 'pallas'),
    ('tpu', jnp.bfloat16, {'weights'}, 'xla'),
    ('cpu', jnp.bfloat16, {'causal'}, 'xla'),
])
def test_auto_picks_the_best_impl_that_provides_the_features(backend, dtype, needed, expected):
  assert registry.resolve_impl('dot_product', 'auto', needed, dtype, backend) == expected


def test_auto_for_kinds_without_fused_impls_and_bad_impls():
  assert registry.resolve_impl('linear', 'auto', {'causal'}, jnp.bfloat16, 'gpu') == 'xla'
  assert registry.resolve_impl('dot_product', 'pallas', {'dropout'}) == 'pallas'
  with pytest.raises(ConfigError, match=r"impl='triton' is invalid.*'auto'"):
    registry.lookup('dot_product', 'triton')
  cfg = AttentionConfig(kind='dot_product', impl='pallas')
  with pytest.raises(ConfigError, match='dropout.*no dropout pattern'):
    registry.require(cfg, {'causal', 'dropout'})


def _cudnn_core(**options):
  cfg = AttentionConfig(kind='dot_product', impl='cudnn', options=options)
  return registry.build(cfg, num_heads=4, num_kv_heads=2, head_dim=16, rngs=nnx.Rngs(0))


def _qkv(b, t, s):
  ks = jax.random.split(jax.random.key(7), 3)
  return (jax.random.normal(ks[0], (b, t, 4, 16)), jax.random.normal(ks[1], (b, s, 2, 16)),
          jax.random.normal(ks[2], (b, s, 2, 16)))


def _masks():
  seg = jnp.asarray([[1] * 9 + [2] * 12 + [0] * 3, [1] * 20 + [0] * 4])
  pos = jnp.asarray([list(range(9)) + list(range(12)) + [0] * 3, list(range(20)) + [0] * 4])
  yield 'packed-causal-window', 24, 24, AttentionMask(
      q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, causal=True,
      window=5)
  yield 'padding-two-sided-window', 24, 24, AttentionMask(
      q_segment_ids=(seg != 0).astype(jnp.int32), kv_segment_ids=(seg != 0).astype(jnp.int32),
      window=4)
  yield 'cross-padding', 8, 24, AttentionMask(
      q_segment_ids=jnp.ones((2, 8), jnp.int32), kv_segment_ids=(seg != 0).astype(jnp.int32))
  qpos = jnp.asarray([[13, 14], [5, 6]])
  slots = (jnp.arange(24)[None] < qpos[:, -1:] + 1).astype(jnp.int32)
  yield 'decode', 2, 24, AttentionMask(
      q_segment_ids=jnp.ones((2, 2), jnp.int32), kv_segment_ids=slots, q_positions=qpos,
      kv_positions=jnp.broadcast_to(jnp.arange(24), (2, 24)), causal=True)


@pytest.mark.parametrize('name', [m[0] for m in _masks()])
def test_cudnn_mask_translation_equals_the_reference(name):
  _, t, s, mask = next(m for m in _masks() if m[0] == name)
  q, k, v = _qkv(2, t, s)
  core = _cudnn_core(implementation='xla')
  got = core(q, k, v, mask)
  want = dot_product_attention(q, k, v, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cudnn_runs_on_gpu_and_fails_elsewhere_with_an_actionable_message():
  q, k, v = _qkv(1, 8, 8)
  mask = AttentionMask(causal=True)
  if jax.default_backend() == 'gpu':  # a GPU machine: cuDNN must run, FlashAttention rule
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref32 = dot_product_attention(*(x.astype(jnp.float32) for x in lo), mask)
    err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref32)))
    assert err(_cudnn_core()(*lo, mask)) <= 2 * err(dot_product_attention(*lo, mask)) + 1e-5
    return
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'auto', 'pallas' or 'xla'"):
    _cudnn_core()(q, k, v, mask)
  with pytest.raises(ValueError, match="implementation='triton' is invalid"):
    _cudnn_core(implementation='triton')


def _quickstart_tiny(impl, steps):
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  c = importlib.import_module('quickstart').get_config('size=tiny')
  c.model.attention.impl = impl
  c.train.update(steps=steps, batch_size=8, log_every=1, eval_every=1000, test_batches=0,
                 checkpoint_every=1000, sample_tokens=0, progress=False, async_checkpoint=False)
  c.optim.total_steps = steps
  return c


def test_model_trained_with_pallas_matches_xla(tmp_path):
  losses = {}
  for impl in ('xla', 'pallas'):
    workdir = str(tmp_path / impl)
    train_and_evaluate(_quickstart_tiny(impl, steps=4), workdir)
    losses[impl] = [r['loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
                    if 'loss' in r]
  assert len(losses['xla']) == 4
  assert losses['xla'][0] != losses['xla'][-1]  # the parameters moved
  np.testing.assert_allclose(losses['pallas'], losses['xla'], rtol=2e-6, atol=0)


def test_pallas_options_are_validated():
  bad = dataclasses.replace(AttentionConfig(kind='dot_product', impl='pallas'),
                            options={'block_q': 48})
  with pytest.raises(ValueError, match=r'options.block_q=48 is invalid: it must be a power'):
    registry.build(bad, num_heads=2, num_kv_heads=1, head_dim=16, rngs=nnx.Rngs(0))


def _family_logits(name, impl):
  """Logits of a tiny `name` model (same seed for every impl) on a padded batch."""
  t = 12
  common = dict(vocab_size=61, d_model=32, num_layers=2, max_length=16,
                attention=dict(impl=impl, num_heads=4, num_kv_heads=2,
                               options=dict(PALLAS_TILES) if impl == 'pallas' else {}))
  if name == 'mistral':
    common['attention']['window'] = 5  # shorter than the sequence, so the band is exercised
  toks = jax.random.randint(jax.random.key(1), (2, t), 4, 61)
  seg = jnp.array([[1] * t, [1] * 7 + [0] * (t - 7)])
  if name == 'vit':
    model = build_model(family(name, image_size=16, patch_size=4, num_labels=5, **common), seed=4)
    return model(jax.random.normal(jax.random.key(0), (2, 16, 16, 3))).logits
  if name == 'perceiver':
    common['attention'].pop('num_kv_heads')
    cfg = family(name, num_labels=3, perceiver=dict(num_latents=8, fourier_bands=4),
                 position=dict(kind='learned', max_length=16), **common)
    return build_model(cfg, seed=4)(toks, segment_ids=seg).logits
  model = build_model(family(name, **common), seed=4)
  if name in ('bert', 'roberta'):
    return model(toks, segment_ids=seg).logits
  if name in ('t5', 't5_v1_1', 'bart', 'transformer'):
    return model(toks, toks[:, :9], encoder_segment_ids=seg).logits
  return model(toks).logits  # decoders


PALLAS_TILES = {'block_q': 16, 'block_k': 16, 'block_q_bwd': 16, 'block_k_bwd': 16}
EXACT_FAMILIES = ['gpt2', 'llama', 'mistral', 'mixtral', 'bert', 'roberta', 't5', 't5_v1_1',
                  'bart', 'transformer', 'vit', 'perceiver']


@pytest.mark.parametrize('name', EXACT_FAMILIES)
def test_every_exact_attention_family_runs_on_pallas(name):
  # T5's relative bias goes through the kernel's bias input; BART / T5 / the Transformer use
  # it for cross-attention too.
  want = _family_logits(name, 'xla')
  got = _family_logits(name, 'pallas')
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', ['transformer_xl', 'rnn'])
def test_families_with_their_own_attention_refuse_fused_impls(name):
  with pytest.raises(ConfigError, match="model.attention.impl='pallas' is invalid.*own attention"):
    family(name, attention=dict(impl='pallas'))
