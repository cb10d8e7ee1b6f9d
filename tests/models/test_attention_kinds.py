"""Every registered attention kind x impl inside the model families where it makes sense.

The generic properties of tests/attention/test_generic.py hold for a single layer; here each
kind runs inside whole models: a LLaMA-style decoder (causal kinds: causality through the
logits, finite non-zero gradients, cached decoding == full forward for kinds that decode), a
BERT-style encoder (kinds with padding masks: padding invariance of the logits and pooled
output) and the original Transformer encoder-decoder (kinds that are causal and take padding;
kinds that cannot attend to another sequence keep dense cross-attention via
`model.attention.cross_kind='dot_product'`). A kind that lacks a feature a family needs is
refused when the model is built, which is checked too.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxformer.attention import registry
from jaxformer.config import ConfigError
from jaxformer.models import build_model, family

T = 8
ENTRIES = [f'{kind}/{impl}' for kind, impl in registry.entries()]
# Without a 'context' mesh axis, impl 'context_allgather' is the reference core
# (`core.dot_product_attention`, what 'dot_product/xla' runs), so inside these one-device
# models it repeats dot_product/xla: its decoder and encoder-decoder cases (the suite's
# slowest here) run with -m slow; its encoder case keeps the entry in the default suite. Its
# context-parallel path is tested in tests/attention/test_ring.py and tests/parallel/.
SLOW = {('decoder_lm', 'dot_product/context_allgather'),
        ('encoder_decoder', 'dot_product/context_allgather')}


def entries(test: str):
  return [pytest.param(e, marks=pytest.mark.slow) if (test, e) in SLOW else e for e in ENTRIES]


def attention(entry, **extra):
  kind, impl = entry.split('/')
  cls = registry.lookup(kind, impl)
  return dict(kind=kind, impl=impl, num_heads=4, num_kv_heads=2,
              options=dict(getattr(cls, 'example_options', {})), **extra)


def features(entry):
  return registry.lookup(*entry.split('/')).features


def tokens(cfg, b=2, t=T, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 4, cfg.vocab_size)


def tiny(name, entry, **kw):
  return family(name, vocab_size=61, d_model=32, num_layers=2, max_length=T,
                attention=attention(entry, **kw.pop('attention', {})), **kw)


@pytest.mark.parametrize('entry', entries('decoder_lm'))
def test_decoder_lm(entry):
  if 'causal' not in features(entry):
    with pytest.raises(ConfigError, match='causal'):
      build_model(tiny('llama', entry))
    return
  cfg = tiny('llama', entry)
  model = build_model(cfg, seed=1)
  toks = tokens(cfg)
  full = nnx.jit(lambda m, x: m(x).logits)(model, toks)
  chex.assert_shape(full, (2, T, cfg.vocab_size))
  chex.assert_tree_all_finite(full)
  changed = toks.at[:, 5:].set((toks[:, 5:] + 7) % cfg.vocab_size)
  chex.assert_trees_all_close(model(changed).logits[:, :5], full[:, :5], atol=1e-5)
  grads = nnx.grad(lambda m: jnp.mean(m(toks).logits ** 2))(model)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  chex.assert_tree_all_finite(leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0.0
  if 'decode' not in features(entry):
    return
  cache = model.init_cache(2, T)
  pos = jnp.broadcast_to(jnp.arange(T)[None], (2, T))
  out = model(toks[:, :3], positions=pos[:, :3], cache=cache)
  steps, cache = [out.logits], out.cache
  for t in range(3, T):
    out = model(toks[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
    steps.append(out.logits)
    cache = out.cache
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize('entry', entries('encoder_padding_invariance'))
def test_encoder_padding_invariance(entry):
  if 'padding' not in features(entry):
    with pytest.raises(ConfigError, match='padding'):
      build_model(tiny('bert', entry))
    return
  cfg = tiny('bert', entry, pooler=True, num_labels=3)
  model = build_model(cfg, seed=2)
  toks = tokens(cfg)
  seg = jnp.array([[1] * T, [1] * 5 + [0] * (T - 5)])
  out = model(toks, segment_ids=seg)
  out2 = model(toks.at[1, 5:].set(9), segment_ids=seg)
  chex.assert_tree_all_finite(out.logits)
  chex.assert_trees_all_close(out2.logits[1, :5], out.logits[1, :5], atol=1e-5)
  chex.assert_trees_all_close(out2.logits[0], out.logits[0], atol=1e-5)
  chex.assert_trees_all_close(out2.pooled, out.pooled, atol=1e-5)


@pytest.mark.parametrize('entry', entries('encoder_decoder'))
def test_encoder_decoder(entry):
  if 'causal' not in features(entry):  # the decoder's self-attention is causal
    with pytest.raises(ConfigError, match='causal'):
      build_model(tiny('transformer', entry, attention=dict(cross_kind='dot_product')))
    return
  cross = {} if 'cross' in features(entry) else dict(cross_kind='dot_product')
  cfg = tiny('transformer', entry, attention=cross)
  model = build_model(cfg, seed=3)
  src, tgt = tokens(cfg, seed=1), tokens(cfg, t=6, seed=2)
  src_seg = jnp.array([[1] * T, [1] * 5 + [0] * (T - 5)])
  full = model(src, tgt, encoder_segment_ids=src_seg).logits
  chex.assert_tree_all_finite(full)
  chex.assert_trees_all_close(
      model(src.at[1, 5:].set(3), tgt, encoder_segment_ids=src_seg).logits, full, atol=1e-5)
  chex.assert_trees_all_close(
      model(src, tgt.at[:, 4:].set(1), encoder_segment_ids=src_seg).logits[:, :4],
      full[:, :4], atol=1e-5)
  if cross:
    with pytest.raises(ConfigError, match='cross'):
      build_model(tiny('transformer', entry))
