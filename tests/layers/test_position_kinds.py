"""Generic properties of every registered position kind (jaxformer/layers/position_registry.py).

Parameterised over `position_registry.kinds()`, so a new kind is tested as soon as it registers:
cached decoding equals the full forward pass; shifting every position by a constant leaves the
output unchanged exactly when the kind declares `shift_invariant`; the registry features a kind
declares (`attention_features`) are asked of the attention core.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxformer.attention import registry as attention_registry
from jaxformer.config import ConfigError
from jaxformer.layers import position_registry
from jaxformer.models import build_model, family

KINDS = position_registry.kinds()
T = 5  # the causal T5 buckets (8, max_exact 4) reach their first logarithmic bucket


def tiny(kind, **kw):
  over = dict(vocab_size=31, d_model=32, num_layers=1, max_length=16, scan_layers=False,
              attention=dict(num_heads=4, num_kv_heads=2),
              position=dict(kind=kind, num_buckets=8, max_distance=16, shaw_max_relative=3))
  return family('llama', **{**over, **kw})


def forward(model, tokens, positions, cache=None):
  # Eager: the primitives compiled for one kind serve the next (cheaper than a jit per kind).
  out = model(tokens, positions=positions, cache=cache)
  return out.logits, out.cache


@pytest.mark.parametrize('kind', KINDS)
def test_cached_decoding_and_shift_invariance(kind):
  model = build_model(tiny(kind), seed=0)
  toks = jax.random.randint(jax.random.key(1), (2, T), 0, 31)
  pos = jnp.broadcast_to(jnp.arange(T)[None], (2, T))
  full, _ = forward(model, toks, pos)
  chex.assert_tree_all_finite(full)

  # One token at a time through the KV cache.
  cache, steps = model.init_cache(2, 8), []
  for t in range(T):
    logits, cache = forward(model, toks[:, t:t + 1], pos[:, t:t + 1], cache)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)

  shifted, _ = forward(model, toks, pos + 5)
  diff = float(jnp.max(jnp.abs(shifted - full)))
  if position_registry.lookup(kind).shift_invariant:
    assert diff < 1e-5, f'{kind} declares shift_invariant but shifting changed logits by {diff}'
  else:
    assert diff > 1e-3, f'{kind} does not declare shift_invariant, yet shifting changed nothing'


@pytest.mark.parametrize('kind', [k for k in KINDS
                                  if position_registry.lookup(k).attention_features])
def test_declared_attention_features_are_required_of_the_core(kind):
  needed = position_registry.lookup(kind).attention_features
  lacking = [(k, i) for k, i in attention_registry.entries()
             if not needed <= set(attention_registry.lookup(k, i).features)
             and {'causal', 'padding'} <= set(attention_registry.lookup(k, i).features)]
  assert lacking, f'every attention kind provides {sorted(needed)}: nothing to refuse'
  k, i = lacking[0]
  with pytest.raises(ConfigError, match=sorted(needed - set(
      attention_registry.lookup(k, i).features))[0]):
    build_model(tiny(kind, attention=dict(kind=k, impl=i, num_heads=4, num_kv_heads=2)))


def test_unknown_kind_lists_the_registry():
  with pytest.raises(ConfigError, match=r"model\.position\.kind='xpos' is invalid: allowed "
                     r'values are \[' + ', '.join(repr(k) for k in KINDS) + r'\]'):
    build_model(tiny('xpos'))


def test_sinusoidal_needs_an_even_width():
  with pytest.raises(ConfigError, match=r'model\.d_model=27 .*sinusoidal'):
    build_model(tiny('sinusoidal', d_model=27, attention=dict(num_heads=3, num_kv_heads=1)))

