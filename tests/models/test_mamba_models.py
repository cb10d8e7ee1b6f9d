"""The 'mamba' family and hybrid attention/Mamba stacks (CATALOG D10): the layer pattern, cached
decoding == full forward, causality, packing and left padding, scan == unrolled and remat == none
(outputs and gradients), a hybrid stack trains, and what the config refuses."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.models import build_model, family
from jaxformer.models.block import MambaBlock, TransformerBlock

TINY = dict(vocab_size=61, d_model=32, num_layers=2, max_length=64, attention=dict(num_heads=4),
            init_std=0.1)
# Attention (RoPE) + FFN in odd layers, Mamba + FFN in even ones (Jamba's pattern): scanned
# groups of [Mamba, attention].
HYBRID = family('mamba', **TINY, position=dict(kind='rope'),
                mamba=dict(d_state=4, attention_every=2, ffn=True))


@functools.cache
def hybrid():
  return build_model(HYBRID, seed=2)


def same_params(model, cfg):
  """`model`'s parameters in a model built for `cfg` (same shapes; no initialiser compiled)."""
  other = nnx.eval_shape(lambda: build_model(cfg))
  nnx.update(other, nnx.state(model))
  return other


def test_hybrid_stack_interleaves_mamba_and_attention_layers():
  model = nnx.eval_shape(lambda: build_model(HYBRID.replace(num_layers=4)))
  assert model.stack.num_groups == 2
  assert [type(b) for b in model.stack.layers.blocks] == [MambaBlock, TransformerBlock]
  pure = nnx.eval_shape(lambda: build_model(family('mamba', **TINY)))
  assert pure.stack.num_groups == 2 and pure.stack.layers.blocks[0].ffn is None


@nnx.jit
def _decode_checks(model, toks):
  """toks [2, 8] -> (full logits, the same with rows 0 and 1 changed after position 5, row 0
  packed after 4 tokens of row 1, prefill-then-step logits of both rows)."""
  changed = toks.at[:, 5:].set((toks[:, 5:] + 7) % 61)
  packed = jnp.concatenate([toks[1:, :4], toks[:1, :4]], axis=1)
  rows = jnp.concatenate([toks, changed, packed], axis=0)
  seg = jnp.concatenate([jnp.ones((4, 8), jnp.int32), jnp.array([[1] * 4 + [2] * 4])], axis=0)
  logits = model(rows, segment_ids=seg).logits
  # Prompts into an empty cache, row 1 left-padded (segment id 0): row 0 holds 5 tokens, row 1
  # its first 3; then three steps of one token each.
  prompt = jnp.stack([toks[0, :5], jnp.concatenate([jnp.zeros((2,), toks.dtype), toks[1, :3]])])
  out = model(prompt, segment_ids=jnp.array([[1] * 5, [0, 0, 1, 1, 1]]),
              positions=jnp.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]),
              cache=model.init_cache(2, 8))
  steps, cache = [out.logits], out.cache
  for s in range(3):
    pos = jnp.array([[5 + s], [3 + s]])
    out = model(jnp.take_along_axis(toks, pos, axis=1), positions=pos, cache=cache)
    steps.append(out.logits)
    cache = out.cache
  return logits[:2], logits[2:4], logits[4:], jnp.concatenate(steps, axis=1)


def test_hybrid_cached_decoding_causality_padding_and_packing():
  toks = jax.random.randint(jax.random.key(0), (2, 8), 0, HYBRID.vocab_size)
  full, changed, packed, stepped = _decode_checks(hybrid(), toks)
  assert float(jnp.std(full)) > 0.05  # logits that depend on the tokens
  chex.assert_trees_all_close(changed[:, :5], full[:, :5], atol=1e-5)
  chex.assert_trees_all_close(packed[:, 4:], full[:1, :4], atol=1e-5)
  chex.assert_trees_all_close(stepped[0], full[0], atol=1e-5)
  chex.assert_trees_all_close(stepped[1, 2:], full[1, :6], atol=1e-5)


def _grads(model, toks):
  loss = lambda m: jnp.mean(m(toks).logits ** 2)  # noqa: E731
  return nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))


@pytest.mark.slow
@pytest.mark.parametrize('over', [dict(scan_layers=False, remat='full'), dict(remat='dots'),
                                  dict(scan_unroll=2)])
def test_hybrid_loops_and_remat_give_the_same_gradients(over):
  toks = jax.random.randint(jax.random.key(1), (2, 8), 0, HYBRID.vocab_size)
  other = same_params(hybrid(), HYBRID.replace(**over))
  chex.assert_trees_all_close(_grads(other, toks), _grads(hybrid(), toks), atol=1e-5,
                              rtol=1e-5)


def test_hybrid_stack_trains():
  """Adam memorises a fixed batch: the next-token loss falls well below its start."""
  cfg = HYBRID
  model = nnx.clone(hybrid())
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  toks = jax.random.randint(jax.random.key(5), (2, 13), 0, cfg.vocab_size)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      logits = m(toks[:, :-1]).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  losses = [float(step(model, opt)) for _ in range(30)]
  assert losses[0] > 3.5  # about log(61) at init
  assert losses[-1] < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize('over, field', [
    (dict(reversible=True), 'model.family'),
    (dict(moe=dict(num_experts=4)), 'model.moe.num_experts'),
    (dict(position=dict(kind='rope')), 'model.position.kind'),
    (dict(attention=dict(kind='linear')), 'model.attention.kind'),
    (dict(mamba=dict(scan='cumsum')), 'model.mamba.scan'),
    (dict(mamba=dict(dt_min=0.5, dt_max=0.1)), 'model.mamba.dt_min'),
    (dict(mamba=dict(attention_every=-1)), 'model.mamba.attention_every'),
])
def test_config_refuses_what_mamba_cannot_do(over, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    family('mamba', **{**TINY, **over})


def test_attention_period_must_divide_the_depth():
  with pytest.raises(ConfigError, match=r'model\.mamba\.attention_every=3'):
    build_model(family('mamba', **{**TINY, 'num_layers': 4}, mamba=dict(attention_every=3)))
