"""CATALOG K: bottleneck adapters, prefix tuning and prompt tuning (jaxformer/layers/peft.py).

Oracles: a model with adapters equals its base at init (zero up-projection); prompt tuning with
the prompt set to the embeddings of tokens c equals the base model fed [c; x] at x's positions;
prefix tuning with the prefixes set to the keys and values the base computes for c equals the
base fed [c; x]; packed segments each see the prefixes; cached decoding equals the full forward
pass; parameter counts equal the formulas; gradients of the loss reach exactly the PEFT
parameters and a few SGD steps on them alone lower it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ConfigError, PEFTConfig
from jaxformer.layers import peft
from jaxformer.models import build_model, family
from jaxformer.parallel.sharding import names_of
from jaxformer.train import optimizer

TINY = dict(vocab_size=61, d_model=32, num_layers=2, max_length=64,
            attention=dict(num_heads=4, num_kv_heads=2))
ALL = dict(adapter_dim=4, prefix_length=3, prompt_length=2)


def models(name, peft_cfg, **over):
  """(base, peft model) where the PEFT model holds the base's parameters; one layer unless
  `over` says otherwise."""
  over = {**TINY, 'num_layers': 1, **over}
  if name in ('bert', 'roberta', 'gpt2'):
    over['attention'] = dict(num_heads=4)
  cfg = family(name, **over, peft=peft_cfg)
  base = build_model(cfg.replace(peft=PEFTConfig()), rngs=nnx.Rngs(0))
  m = build_model(cfg, rngs=nnx.Rngs(1))
  nnx.update(m, nnx.state(base, nnx.Param))
  return base, m


def randomize(m, role, seed=0, scale=0.3):
  """Random values for the parameters of `role` (so an adapter is no longer the identity)."""
  state = nnx.state(m, peft.trainable_filter((role,)))
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(m, jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 3, 61)


# ------------------------------------------------------------------------ adapters, prompts
def test_parameter_counts_names_and_optimizer_roles():
  d, r, p, q, k, h = 32, 4, 3, 2, 2, 8
  site = 2 * d * r + r + d
  cfg = family('llama', **TINY, peft=ALL)  # 2 layers x 2 sites (attention, ffn)
  m = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))  # shapes and metadata
  want = {'adapter': 2 * 2 * site, 'prefix': 2 * 2 * p * k * h, 'prompt': q * d}
  assert peft.counts(m) == want == peft.expected_counts(cfg)
  cfg = family('t5', **TINY, peft=dict(ALL, adapter_sites=('attention', 'cross_attention',
                                                            'ffn')))
  # 2 encoder layers x 2 sites + 2 decoder layers x 3 sites; prefixes in both stacks
  want = {'adapter': 10 * site, 'prefix': 4 * 2 * p * k * h, 'prompt': q * d}
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  assert peft.counts(abstract) == want == peft.expected_counts(cfg)

  block = m.stack.layers.blocks[0]
  assert names_of(block.self_attn.prefix.k) == ('layers', None, 'kv_heads', 'head_dim')
  assert names_of(block.attn_sub.adapter.w_down) == ('layers', 'embed', None)
  assert names_of(m.prompt.vectors) == (None, 'embed')
  assert block.ffn_sub.adapter.w_up.get_metadata()['role'] == 'adapter'
  params = nnx.state(m, nnx.Param)
  decay = optimizer.decay_mask(params, decay_embeddings=False)
  layer = decay['stack']['layers']['blocks'][0]
  assert layer['attn_sub']['adapter']['w_down'] and layer['self_attn']['prefix']['k']
  assert not layer['attn_sub']['adapter']['b_down']
  assert not decay['prompt']['vectors']  # part of the input embedding
  scales = optimizer.layerwise_lr_scales(params, 0.5)
  np.testing.assert_allclose(
      np.ravel(scales['stack']['layers']['blocks'][0]['self_attn']['prefix']['k']), [0.25, 0.5])
  assert scales['prompt']['vectors'] == 0.125


@pytest.mark.parametrize('name', [
    'gpt2', 'bert', 't5', pytest.param('llama', marks=pytest.mark.slow),
    pytest.param('bart', marks=pytest.mark.slow)])
def test_adapters_start_as_the_base_and_a_token_prompt_equals_the_base_fed_the_tokens(name):
  """Adapters at init are the identity; prompt := E[c] makes the model the base fed [c; x]."""
  over = dict(num_labels=3, mlm_head=False, pooler=True) if name == 'bert' else {}
  seq2seq = name in ('t5', 'bart')
  sites = ('attention', 'cross_attention', 'ffn') if seq2seq else ('attention', 'ffn')
  base, m = models(name, dict(adapter_dim=4, adapter_sites=sites, prompt_length=3), **over)
  c, x = tokens(2, (3,)), tokens(3, (2, 7))
  peft.init_prompt_from_tokens(m, c)
  cx = jnp.concatenate([jnp.broadcast_to(c, (2, 3)), x], axis=1)
  if seq2seq:
    y = tokens(4, (2, 5))
    fwd, want = nnx.jit(lambda m: m(x, y).logits), base(cx, y).logits
  elif name == 'bert':  # the classifier reads [CLS] = x[:, 0], after the prompt
    tt = jnp.ones_like(x)
    fwd = nnx.jit(lambda m: m(x, token_types=tt).hidden)
    want = base(cx, token_types=jnp.pad(tt, ((0, 0), (3, 0)))).hidden[:, 3:]
  else:
    fwd, want = nnx.jit(lambda m: m(x).logits), base(cx).logits[:, 3:]
  run = lambda: fwd(m)  # noqa: E731
  # h + 0 is exact; the adapter's ops sit in the same compiled (scanned) layer body, whose
  # fusion then differs: float32 rounding of the same sums, not a different function.
  np.testing.assert_allclose(run(), want, rtol=0, atol=1e-5)
  randomize(m, 'adapter')
  assert np.abs(run() - want).max() > 1e-3


# ------------------------------------------------------------------------ prefix tuning
def set_prefixes_from_context(base, m, c):
  """Each layer's prefix := the base's keys / values of context c at positions 0..P-1."""
  p = c.shape[-1]
  cache = base.init_cache(1, p)
  cache = base(c[None], positions=jnp.arange(p)[None], cache=cache).cache
  pre = m.stack.layers.blocks[0].self_attn.prefix
  pre.k[...] = cache[0]['self']['k'][:, 0]
  pre.v[...] = cache[0]['self']['v'][:, 0]


@pytest.mark.parametrize('name', ['llama', pytest.param('gpt2', marks=pytest.mark.slow),
                                  pytest.param('mistral', marks=pytest.mark.slow)])
def test_prefixes_equal_the_base_attending_to_a_context(name):
  over = dict(attention=dict(num_heads=4, num_kv_heads=2, window=16)) if name == 'mistral' else {}
  base, m = models(name, dict(prefix_length=3), **over)
  c, x = tokens(5, (3,)), tokens(6, (2, 7))
  set_prefixes_from_context(base, m, c)
  cx = jnp.concatenate([jnp.broadcast_to(c, (2, 3)), x], axis=1)
  got = m(x, positions=jnp.broadcast_to(3 + jnp.arange(7), (2, 7))).logits
  np.testing.assert_allclose(got, base(cx).logits[:, 3:], atol=1e-5)


@pytest.mark.slow
def test_encoder_prefixes_equal_one_layer_attending_to_a_context():
  base, m = models('bert', dict(prefix_length=3), num_layers=1)
  c, x = tokens(7, (3,)), tokens(8, (2, 7))
  pos = jnp.arange(3)[None]
  group = base.stack._first_group()  # post-LN: the attention reads the embeddings themselves
  k, v = group.blocks[0].self_attn._keys_values(base.embedder(c[None], pos))
  pre = m.stack.layers.blocks[0].self_attn.prefix
  pre.k[...], pre.v[...] = k, v
  cx = jnp.concatenate([jnp.broadcast_to(c, (2, 3)), x], axis=1)
  got = m(x, positions=jnp.broadcast_to(3 + jnp.arange(7), (2, 7))).logits
  np.testing.assert_allclose(got, base(cx).logits[:, 3:], atol=1e-5)


def test_every_packed_segment_sees_the_prefixes():
  _, m = models('llama', dict(prefix_length=3, adapter_dim=4))
  randomize(m, 'adapter')
  a, b = tokens(9, (1, 5)), tokens(10, (1, 4))
  packed = m(jnp.concatenate([a, b], 1),
             segment_ids=jnp.asarray([[1] * 5 + [2] * 4])).logits
  np.testing.assert_allclose(packed[:, :5], m(a).logits, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], m(b).logits, atol=1e-5)


# ------------------------------------------------------------------------ decoding
@pytest.mark.parametrize('name', ['llama', pytest.param('gpt2', marks=pytest.mark.slow)])
def test_cached_decoding_equals_the_full_forward(name):
  _, m = models(name, ALL, init_std=0.3, num_layers=2)
  for role in ('adapter', 'prefix', 'prompt'):
    randomize(m, role)
  x = tokens(11, (2, 7))
  call = nnx.jit(lambda m, x, pos, cache: m(x, positions=pos, cache=cache))
  full = m(x).logits
  out = call(m, x[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)), m.init_cache(2, 7))
  steps = [out.logits]
  for t in range(4, 7):
    out = call(m, x[:, t:t + 1], jnp.full((2, 1), t), out.cache)
    steps.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


@pytest.mark.slow
def test_generate_with_peft_decodes_left_padded_prompts_as_each_alone():
  from jaxformer.inference import generate, generate_seq2seq
  _, m = models('llama', ALL, init_std=0.5)
  for role in ('adapter', 'prefix', 'prompt'):
    randomize(m, role)
  prompts = [[5, 9, 13], [11, 3, 8, 20, 4]]
  batched = np.asarray(generate(m, prompts, max_new_tokens=4).tokens)
  ref = []
  for p in prompts:  # greedy by the full forward pass, recomputed each step
    buf = list(p)
    for _ in range(4):
      buf.append(int(jnp.argmax(m(jnp.asarray([buf])).logits[0, -1])))
    ref.append(buf[len(p):])
  np.testing.assert_array_equal(batched, ref)
  _, s = models('t5', ALL, init_std=1.0)
  for role in ('adapter', 'prefix', 'prompt'):
    randomize(s, role)
  out = np.asarray(generate_seq2seq(s, prompts, start_id=0, max_new_tokens=3).tokens)
  for row, p in zip(out, prompts):
    buf = [0]
    for _ in range(3):
      buf.append(int(jnp.argmax(s(jnp.asarray([p]), jnp.asarray([buf])).logits[0, -1])))
    np.testing.assert_array_equal(row, buf[1:])


# ------------------------------------------------------------------------ training
def test_only_peft_parameters_get_gradients_and_sgd_on_them_lowers_the_loss():
  _, m = models('gpt2', ALL)
  x = tokens(12, (4, 12))
  trainable = peft.trainable_filter()
  frozen = nnx.All(nnx.Param, nnx.Not(trainable))
  before = jax.tree.map(np.asarray, nnx.state(m, frozen))

  @nnx.jit
  def loss_and_grads(m):
    def loss(m):
      logits = m(x[:, :-1]).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, trainable))(m)

  first, g = loss_and_grads(m)
  leaves = jax.tree_util.tree_flatten_with_path(g)[0]
  assert {str(p[-2].key) for p, _ in leaves} >= {'w_up', 'w_down', 'k', 'v', 'vectors'}

  def check_nonzero(g, step):
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
      size = np.abs(np.asarray(leaf)).max()
      # With W_up = 0 the down-projection gets no gradient before the first update.
      if step == 0 and str(path[-2].key) in ('w_down', 'b_down'):
        assert size == 0, path
      else:
        assert size > 0, (step, path)

  value = first
  for step in range(5):
    check_nonzero(g, step)
    nnx.update(m, jax.tree.map(lambda p, d: p - 0.5 * d, nnx.state(m, trainable), g))
    value, g = loss_and_grads(m)
  assert value < first - 0.05, (first, value)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, nnx.state(m, frozen)))


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize('name,over,field', [
    ('transformer_xl', dict(peft=dict(adapter_dim=4)), 'model.peft.adapter_dim'),
    ('vit', dict(peft=dict(prompt_length=2)), 'model.peft.prompt_length'),
    ('mamba', dict(peft=dict(prefix_length=2)), 'model.peft.prefix_length'),
    ('gpt2', dict(peft=dict(adapter_dim=4, adapter_sites=('cross_attention',))),
     'model.peft.adapter_sites'),
    ('gpt2', dict(peft=dict(adapter_dim=4, adapter_sites=('mlp',))), 'model.peft.adapter_sites'),
    ('gpt2', dict(peft=dict(prefix_length=2), attention=dict(kind='linear')),
     'model.peft.prefix_length'),
    ('gpt2', dict(peft=dict(prefix_length=2), position=dict(kind='shaw')),
     'model.peft.prefix_length'),
    ('gpt2', dict(peft=dict(prompt_length=64)), 'model.peft.prompt_length'),
    ('mixtral', dict(peft=dict(prompt_length=2), moe=dict(router='hash')),
     'model.peft.prompt_length'),
    ('reformer', dict(peft=dict(adapter_dim=4), attention=dict(kind='dot_product')),
     'model.peft.adapter_dim'),
    ('gpt2', dict(peft=dict(prompt_length=-1)), 'model.peft.prompt_length'),
])
def test_what_cannot_work_is_refused_at_config_time(name, over, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    family(name, vocab_size=61, d_model=32, max_length=64, **over)


def test_sequence_too_long_with_the_prompt_is_refused():
  _, m = models('gpt2', dict(prompt_length=4))
  with pytest.raises(ValueError, match='prompt of 4'):
    m(tokens(0, (1, 61)))


def test_experiment_refuses_a_prompt_that_does_not_fit_or_packed_rows():
  import os
  from jaxformer.train.experiment import Experiment, load_config
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c = load_config(os.path.join(root, 'configs', 'quickstart.py'), 'size=tiny')
  c.model.peft = dict(prompt_length=4)
  c.data.packing = 'none'
  c.data.seq_len = c.model.max_length - 4
  Experiment.from_config(c)  # fits exactly
  c.data.seq_len += 1
  with pytest.raises(ConfigError, match=r'data\.seq_len=.*prompt \(model\.peft\.prompt_length'):
    Experiment.from_config(c)
  c.data.seq_len -= 1
  c.data.packing = 'concat'
  with pytest.raises(ConfigError, match=r"data\.packing='concat'.*prompt_length=4"):
    Experiment.from_config(c)
