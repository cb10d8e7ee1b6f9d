"""Optimizers and update transforms (CATALOG F1, F3): optax references, masks, accumulation."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections.config_flags import config_flags

from jaxformer.attention import registry as attention_registry
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models import build_model, family_dict, family_names
from jaxformer.parallel.sharding import path_str
from jaxformer.train import optimizer as opt_lib
from jaxformer.train.optimizer import OptimConfig, make_optimizer
from jaxformer.train.schedules import make_schedule


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  return {
      'embed': {'embedding': jax.random.normal(k[0], (5, 3))},
      'dense': {'kernel': jax.random.normal(k[1], (3, 3)), 'bias': jax.random.normal(k[2], (3,))},
      'final_norm': {'scale': 1.0 + jax.random.normal(k[3], (3,))},
      'head': {'kernel': jax.random.normal(k[4], (3, 4))},
  }


# What the parameters of _params() are, as a model would say it (logical axis names).
_NAMES = {'embed': {'embedding': ('vocab', 'embed')},
          'dense': {'kernel': ('embed', 'mlp'), 'bias': ('mlp',)},
          'final_norm': {'scale': ('embed',)}, 'head': {'kernel': ('embed', 'vocab')}}


def _param(x, names, **metadata):
  return nnx.Param(x, out_sharding=tuple(names), eager_sharding=False, **metadata)


def _named(params, names):
  """`params` as nnx.Params carrying `names` (a tree of name tuples): what make_optimizer reads."""
  return jax.tree.map(lambda n, x: _param(x, n), names, params,
                      is_leaf=lambda n: isinstance(n, tuple))


def _grads(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, num_steps, grads_fn=_grads):
  state, update = tx.init(params), jax.jit(tx.update)
  for i in range(num_steps):
    updates, state = update(grads_fn(params, 100 + i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _hand_mask(decay_embeddings=True):
  return {'embed': {'embedding': decay_embeddings}, 'dense': {'kernel': True, 'bias': False},
          'final_norm': {'scale': False}, 'head': {'kernel': True}}


# ---------------------------------------------------------------------------- config
def test_config_from_configdict_and_errors_name_the_field():
  c = ml_collections.ConfigDict({'optimizer': 'lion', 'lr': 1, 'adafactor': {'decay_rate': 0.5}})
  cfg = OptimConfig.from_dict(c)
  assert cfg.optimizer == 'lion' and cfg.lr == 1.0 and cfg.adafactor.decay_rate == 0.5
  with pytest.raises(ConfigError, match=r"optim.optimizer='adan'.*'adamw'"):
    OptimConfig.from_dict({'optimizer': 'adan'})
  # total_steps unset: the trainer makes the schedule as long as the run; a schedule built
  # directly from such a config says what is missing.
  unset = OptimConfig.from_dict({'schedule': 'warmup_cosine'})
  with pytest.raises(ConfigError, match=r'optim.total_steps=None.*warmup_cosine'):
    make_schedule(unset)
  with pytest.raises(ConfigError, match=r'optim.total_steps=4 is invalid.*> optim.warmup_steps=4'):
    OptimConfig.from_dict({'schedule': 'warmup_cosine', 'warmup_steps': 4, 'total_steps': 4})
  with pytest.raises(ConfigError, match=r"optim.weight_decay.*'adamw'"):
    OptimConfig.from_dict({'optimizer': 'adam', 'weight_decay': 0.1})
  with pytest.raises(ConfigError, match=r'optim: unknown field\(s\) \[.lr_max.\]'):
    OptimConfig.from_dict({'lr_max': 1.0})
  with pytest.raises(ConfigError, match=r'optim.adafactor.decay_rate'):
    OptimConfig.from_dict({'adafactor': {'decay_rate': 0.0}})
  with pytest.raises(ConfigError, match=r'optim.layerwise_lr_decay.*no parameter lies in a layer'):
    make_optimizer(OptimConfig(layerwise_lr_decay=0.5), _named(_params(), _NAMES))


# ---------------------------------------------------------------------------- F1 optimizers
@pytest.mark.parametrize('name, cfg, reference', [
    ('adamw', dict(optimizer='adamw', lr=0.01, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
                   decay_embeddings=False),
     lambda: optax.adamw(0.01, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
                         mask=_hand_mask(decay_embeddings=False))),
    ('adam', dict(optimizer='adam', lr=0.01, b1=0.8),
     lambda: optax.adam(0.01, b1=0.8, b2=0.999, eps=1e-8)),
    ('lion', dict(optimizer='lion', lr=0.001, b1=0.9, weight_decay=0.5),
     lambda: optax.lion(0.001, b1=0.9, b2=0.99, weight_decay=0.5, mask=_hand_mask())),
    ('adafactor', dict(optimizer='adafactor', lr=0.01, weight_decay=0.1,
                       adafactor=dict(min_dim_size_to_factor=2)),
     lambda: optax.adafactor(0.01, min_dim_size_to_factor=2, weight_decay_rate=0.1,
                             weight_decay_mask=_hand_mask())),
    ('sgd', dict(optimizer='sgd', lr=0.1, momentum=0.9, nesterov=True),
     lambda: optax.sgd(0.1, momentum=0.9, nesterov=True)),
])
def test_steps_equal_optax_reference(name, cfg, reference):
  params = _params()
  got, _ = _run(make_optimizer(OptimConfig.from_dict(cfg), _named(params, _NAMES)), params, 3)
  want, _ = _run(reference(), params, 3)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  assert not np.allclose(got['dense']['kernel'], params['dense']['kernel']), name


def test_adamw_first_step_numpy_oracle():
  """Step 1 of AdamW: m_hat = g, v_hat = g^2, p -= lr * (g / (|g| + eps) + wd * p * mask)."""
  lr, wd, eps = 0.01, 0.1, 1e-8
  params = _params()
  tx = make_optimizer(OptimConfig(lr=lr, weight_decay=wd, eps=eps, decay_embeddings=False),
                      _named(params, _NAMES))
  got, _ = _run(tx, params, 1)
  g = _grads(params, 100)
  mask = _hand_mask(decay_embeddings=False)
  want = jax.tree.map(
      lambda p, g, m: np.float64(p) - lr * (np.float64(g) / (np.abs(np.float64(g)) + eps)
                                            + wd * m * np.float64(p)), params, g, mask)
  chex.assert_trees_all_close(got, want, atol=1e-6)


def test_decay_mask_rule():
  """Matrices by their names (two or more axes besides 'layers'), biases by their role."""
  z = jnp.zeros
  params = {
      'embed': {'embedding': _param(z((8, 4)), ('vocab', 'embed'))},
      'positions': {'table': _param(z((8, 4)), ('position', 'embed'))},
      'layers': {'attn': {'wq': _param(z((3, 4, 2, 2)), ('layers', 'embed', 'heads', 'head_dim')),
                          'bq': _param(z((3, 2, 2)), ('layers', 'heads', 'head_dim'),
                                       role='bias'),
                          'bo': _param(z((3, 4)), ('layers', 'embed'))},
                 'ln': {'scale': _param(z((3, 4)), ('layers', 'embed'))},
                 'norm_matrix': {'w': _param(z((3, 4, 4)), ('layers', 'norm', 'embed'))},
                 'shaw': {'table': _param(z((3, 5, 2)), ('layers', 'position', 'head_dim'))},
                 'linformer': {'e': _param(z((3, 8, 2)), ('layers', 'position', None),
                                           role='weight')},
                 'moe': {'wi': _param(z((3, 2, 4, 8)), ('layers', 'expert', 'embed', 'mlp')),
                         'bi': _param(z((3, 2, 8)), ('layers', 'expert', 'mlp'), role='bias')}},
      'final_norm': {'scale': _param(z((4,)), ('embed',))},
      'head': {'kernel': _param(z((4, 8)), ('embed', 'vocab')),
               'bias': _param(z((8,)), ('vocab',))},
      'vit': {'cls': _param(z((1, 1, 4)), (None, None, 'embed'), role='embedding'),
              'pos': _param(z((9, 4)), ('position', 'embed')),
              'patch_w': _param(z((12, 4)), (None, 'embed'), role='embedding'),
              'patch_b': _param(z((4,)), ('embed',), role='embedding')},
      'scalenorm': {'g': _param(z(()), ())},
  }
  want = {
      'embed': {'embedding': True}, 'positions': {'table': True},
      'layers': {'attn': {'wq': True, 'bq': False, 'bo': False}, 'ln': {'scale': False},
                 'norm_matrix': {'w': False}, 'shaw': {'table': True},
                 'linformer': {'e': True}, 'moe': {'wi': True, 'bi': False}},
      'final_norm': {'scale': False}, 'head': {'kernel': True, 'bias': False},
      'vit': {'cls': True, 'pos': True, 'patch_w': True, 'patch_b': False},
      'scalenorm': {'g': False},
  }
  assert opt_lib.decay_mask(params) == want
  no_embed = opt_lib.decay_mask(params, decay_embeddings=False)
  assert no_embed['embed']['embedding'] is False and no_embed['positions']['table'] is False
  assert no_embed['layers']['shaw']['table'] is False
  assert no_embed['layers']['linformer']['e'] is True  # a projection, not a table
  assert no_embed['vit'] == {'cls': False, 'pos': False, 'patch_w': False, 'patch_b': False}
  assert no_embed['head']['kernel'] is True


def test_decay_mask_on_nnx_state_with_variables():
  def names(*n):
    return {'out_sharding': n, 'eager_sharding': False}

  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      nnx.Embed(6, 4, embedding_metadata=names('vocab', 'embed'), rngs=rngs),
      nnx.LayerNorm(4, scale_metadata=names('embed'), bias_metadata=names('embed'), rngs=rngs),
      nnx.Linear(4, 4, kernel_metadata=names('embed', 'mlp'), bias_metadata=names('mlp'),
                 rngs=rngs))
  mask = nnx.as_pure(opt_lib.decay_mask(nnx.state(model, nnx.Param), decay_embeddings=False))
  assert mask['layers'][0]['embedding'] is False
  assert mask['layers'][1] == {'bias': False, 'scale': False}
  assert mask['layers'][2] == {'bias': False, 'kernel': True}


def test_parameters_without_metadata_are_refused_by_path():
  params = _params()
  with pytest.raises(ValueError, match=r"parameter 'dense/bias' is a plain array.*make_optimizer"):
    make_optimizer(OptimConfig(weight_decay=0.1), params)
  tx = make_optimizer(OptimConfig(weight_decay=0.1))  # no params: the update must bring them
  with pytest.raises(ValueError, match=r"parameter 'dense/bias' is a plain array"):
    tx.init(params)
  unnamed = jax.tree.map(nnx.Param, params)
  with pytest.raises(ValueError, match=r"parameter 'dense/bias' has no logical axis names"):
    opt_lib.decay_mask(unnamed)
  bad_role = _named(params, _NAMES)
  bad_role['head']['kernel'] = _param(params['head']['kernel'], ('embed', 'vocab'), role='table')
  with pytest.raises(ValueError, match=r"'head/kernel': metadata role='table' is invalid"):
    opt_lib.decay_mask(bad_role)
  # Without weight decay or layer-wise LR decay nothing needs the metadata.
  _run(make_optimizer(OptimConfig(lr=0.1)), params, 1)


# ---------------------------------------------------------------------------- F3 transforms
def test_clipping_scales_by_global_norm():
  tx = make_optimizer(OptimConfig(optimizer='sgd', lr=1.0, momentum=0.0, grad_clip_norm=1.0))
  params = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1, 1))}
  grads = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([[12.0]])}  # global norm 13
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -g / 13.0, grads), atol=1e-7)
  small = jax.tree.map(lambda g: g / 26.0, grads)  # norm 0.5: unchanged
  updates, _ = tx.update(small, tx.init(params), params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -g, small), atol=1e-7)


def _regression_problem():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (16, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.3
  params = {'w': {'kernel': jax.random.normal(kw, (3, 1))}, 'b': {'bias': jnp.zeros((1,))}}
  names = {'w': {'kernel': ('embed', 'mlp')}, 'b': {'bias': ('mlp',)}}
  loss = lambda p, x, y: jnp.mean((x @ p['w']['kernel'] + p['b']['bias'] - y[:, None]) ** 2)
  return params, names, x, y, jax.jit(jax.grad(loss))


@pytest.mark.parametrize('base', [
    dict(optimizer='adamw', lr=0.05, weight_decay=0.1, grad_clip_norm=0.5,
         schedule='warmup_linear', warmup_steps=1, total_steps=4),
    dict(optimizer='sgd', lr=0.05, momentum=0.9, ema_decay=0.5),  # sensitive to the grad scale
])
def test_accumulation_of_k_micro_batches_equals_one_big_batch(base):
  params, names, x, y, grad = _regression_problem()
  k = 4
  big_tx = make_optimizer(OptimConfig.from_dict(base), _named(params, names))
  acc_tx = make_optimizer(OptimConfig.from_dict(dict(base, grad_accum_steps=k)),
                          _named(params, names))
  big, acc = params, params
  big_state, acc_state = big_tx.init(params), acc_tx.init(params)
  big_update, acc_update = jax.jit(big_tx.update), jax.jit(acc_tx.update)
  for _ in range(3):
    updates, big_state = big_update(grad(big, x, y), big_state, big)
    big = optax.apply_updates(big, updates)
    for i in range(k):
      sl = slice(4 * i, 4 * (i + 1))
      updates, acc_state = acc_update(grad(acc, x[sl], y[sl]), acc_state, acc)
      if i < k - 1:
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
      acc = optax.apply_updates(acc, updates)
    chex.assert_trees_all_close(acc, big, atol=1e-6)
  if 'ema_decay' in base:  # the EMA moves once per real update, not per micro-batch
    chex.assert_trees_all_close(opt_lib.ema_params(acc_state), opt_lib.ema_params(big_state),
                                atol=1e-6)
  assert not np.allclose(big['w']['kernel'], params['w']['kernel'])


def test_layerwise_lr_decay_stacked_layers():
  decay, num = 0.5, 3
  params = {'embed': {'embedding': jnp.zeros((5, 2))},
            'layers': {'mlp': {'kernel': jnp.zeros((num, 2, 2)), 'bias': jnp.zeros((num, 2))}},
            'head': {'kernel': jnp.zeros((2, 5))}}
  names = {'embed': {'embedding': ('vocab', 'embed')},
           'layers': {'mlp': {'kernel': ('layers', 'embed', 'mlp'), 'bias': ('layers', 'mlp')}},
           'head': {'kernel': ('embed', 'vocab')}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer(OptimConfig(optimizer='sgd', lr=1.0, momentum=0.0,
                                  layerwise_lr_decay=decay), _named(params, names))
  updates, _ = tx.update(grads, tx.init(params), params)
  per_layer = np.array([decay ** (num - i) for i in range(num)])  # 0.125, 0.25, 0.5
  np.testing.assert_allclose(updates['layers']['mlp']['kernel'],
                             -np.broadcast_to(per_layer[:, None, None], (num, 2, 2)), atol=0)
  np.testing.assert_allclose(updates['layers']['mlp']['bias'],
                             -np.broadcast_to(per_layer[:, None], (num, 2)), atol=0)
  np.testing.assert_allclose(updates['embed']['embedding'], -decay ** (num + 1), atol=0)
  np.testing.assert_allclose(updates['head']['kernel'], -1.0, atol=0)


def test_layerwise_lr_decay_unstacked_layers():
  """Layers that are not stacked (Transformer-XL's list of blocks) carry their index as metadata."""
  decay = 0.8
  z = jnp.zeros
  named = {'token_embed': _param(z((4, 2)), ('vocab', 'embed')),
           'layers_0': {'w': _param(z((2, 2)), ('embed', 'mlp'), layer=0)},
           'layers_1': {'w': _param(z((2, 2)), ('embed', 'mlp'), layer=1)},
           'blocks': [{'w': _param(z((2,)), ('embed',), layer=i)} for i in range(3)],
           'final_norm': {'scale': _param(z((2,)), ('embed',))}}
  params = nnx.as_pure(named)
  assert opt_lib.num_layers(named) == 3
  scales = opt_lib.layerwise_lr_scales(named, decay)
  want = {'token_embed': decay ** 4, 'layers_0': {'w': decay ** 3},
          'layers_1': {'w': decay ** 2},
          'blocks': [{'w': decay ** 3}, {'w': decay ** 2}, {'w': decay ** 1}],
          'final_norm': {'scale': 1.0}}
  chex.assert_trees_all_close(scales, want)
  tx = make_optimizer(OptimConfig(optimizer='adam', lr=0.1, layerwise_lr_decay=decay), named)
  grads = _grads(params, 3)
  got, _ = tx.update(grads, tx.init(params), params)
  ref, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params), params)
  chex.assert_trees_all_close(got, jax.tree.map(lambda u, s: u * s, ref, want), atol=1e-7)


def test_ema_formula():
  d, lr = 0.9, 0.1
  params = _params()
  tx = make_optimizer(OptimConfig(optimizer='sgd', lr=lr, momentum=0.0, ema_decay=d))
  state = tx.init(params)
  p, ema = params, params
  for i in range(3):
    g = _grads(params, i)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    ema = jax.tree.map(lambda e, q: d * e + (1 - d) * q, ema, p)
  chex.assert_trees_all_close(opt_lib.ema_params(state), ema, atol=1e-6)
  assert not np.allclose(ema['head']['kernel'], p['head']['kernel'])
  with pytest.raises(ValueError, match='ema_decay'):
    opt_lib.ema_params(make_optimizer(OptimConfig()).init(params))


@pytest.mark.parametrize('accum', [1, 2])
def test_skip_nonfinite_leaves_params_unchanged_and_counts(accum):
  cfg = OptimConfig(lr=0.01, weight_decay=0.1, skip_nonfinite=True, grad_accum_steps=accum)
  clean_cfg = cfg.replace(skip_nonfinite=False)
  params = _params()
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(params, 7))
  bad['head']['kernel'] = bad['head']['kernel'].at[0, 0].set(jnp.inf)

  tx = make_optimizer(cfg, _named(params, _NAMES))
  state, update = tx.init(params), jax.jit(tx.update)
  updates, state = update(bad, state, params)
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  assert int(opt_lib.num_skipped(state)) == 1
  p = params
  for i in range(2 * accum):  # the skipped gradient leaves no trace in the later steps
    updates, state = update(_grads(params, i), state, p)
    p = optax.apply_updates(p, updates)
  clean, _ = _run(make_optimizer(clean_cfg, _named(params, _NAMES)), params, 2 * accum,
                  grads_fn=lambda _, i: _grads(params, i - 100))
  chex.assert_trees_all_close(p, clean, atol=1e-6)
  assert int(opt_lib.num_skipped(state)) == 1


def test_nnx_optimizer_with_stacked_layers_and_ema():
  def names(*n):
    return {'out_sharding': n, 'eager_sharding': False}

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(8, 4, embedding_metadata=names('vocab', 'embed'), rngs=rngs)
      linear = lambda r: nnx.Linear(4, 4, kernel_metadata=names('embed', 'mlp'),  # noqa: E731
                                    bias_metadata=names('mlp'), rngs=r)
      self.layers = nnx.vmap(linear, in_axes=0, out_axes=0,
                             transform_metadata={nnx.PARTITION_NAME: 'layers'})(
                                 rngs.fork().split(3))

    def __call__(self, tokens):
      def body(h, layer):
        return layer(h), None
      h, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
          self.embed(tokens), self.layers)
      return h

  model = Model(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert opt_lib.num_layers(params) == 3
  mask = nnx.as_pure(opt_lib.decay_mask(params))
  assert mask['layers'] == {'kernel': True, 'bias': False}
  cfg = OptimConfig(optimizer='sgd', lr=0.1, momentum=0.0, layerwise_lr_decay=0.5, ema_decay=0.5)
  optimizer = nnx.Optimizer(model, make_optimizer(cfg, params), wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.array([[1, 2]])) ** 2))(model)
  optimizer.update(model, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  g = nnx.as_pure(nnx.state(grads, nnx.Param))
  scale = np.array([0.125, 0.25, 0.5])[:, None, None]
  np.testing.assert_allclose(after['layers']['kernel'],
                             before['layers']['kernel'] - 0.1 * scale * g['layers']['kernel'],
                             atol=1e-6)
  ema = opt_lib.ema_params(optimizer.opt_state)
  chex.assert_trees_all_close(ema, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, before, after),
                              atol=1e-6)


def test_layerwise_lr_decay_stacked_groups_of_blocks():
  """models/stack.py layout: 'layers' stacks groups of g blocks; slice s, block j is layer s*g+j
  (block j says layer=j, layers_per_slice=g)."""
  decay, groups = 0.5, 2
  z = jnp.zeros
  params = {'embedder': {'embed': {'embedding': _param(z((5, 2)), ('vocab', 'embed'))}},
            'stack': {'layers': {'blocks': {
                0: {'w': _param(z((groups, 2, 2)), ('layers', 'embed', 'mlp'),
                                layer=0, layers_per_slice=2)},
                1: {'moe': {'w': _param(z((groups, 3, 2, 2)), ('layers', 'expert', 'embed', 'mlp'),
                                        layer=1, layers_per_slice=2)}}}}},
            'head': {'kernel': _param(z((2, 5)), ('embed', 'vocab'))}}
  assert opt_lib.num_layers(params) == 4
  scales = opt_lib.layerwise_lr_scales(params, decay)
  blocks = scales['stack']['layers']['blocks']
  np.testing.assert_array_equal(np.ravel(blocks[0]['w']), [decay ** 4, decay ** 2])  # layers 0, 2
  np.testing.assert_array_equal(np.ravel(blocks[1]['moe']['w']), [decay ** 3, decay ** 1])
  assert blocks[1]['moe']['w'].shape == (groups, 1, 1, 1)
  assert scales['embedder']['embed']['embedding'] == decay ** 5
  assert scales['head']['kernel'] == 1.0


# ---------------------------------------------------------------------------- oracle: every preset
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TINY = dict(vocab_size=32, d_model=16, num_layers=2, max_length=16, attention=dict(num_heads=2),
             ffn=dict(hidden_dim=32))
_FAMILY = {'vit': dict(image_size=8, patch_size=4, num_labels=3, max_length=5),
           'perceiver': dict(num_labels=3),
           'funnel': dict(num_decoder_layers=1, funnel=dict(block_sizes=(1, 1))),
           'swin': dict(image_size=8, patch_size=2, num_labels=3, ffn=dict(hidden_dim=None),
                        swin=dict(depths=(2,), window_size=2)),
           'mixtral': dict(num_layers=4, moe=dict(num_experts=2, top_k=1, every=2))}


def _variant(fam, **over):
  return lambda: family_dict(fam, **{**_TINY, **over})


def _attention(kind, **options):
  return _variant('bert', attention=dict(num_heads=2, kind=kind, options=options))


def _config(name):
  path = os.path.join(_ROOT, 'configs', f'{name}.py')
  return lambda: config_flags._LoadConfigModule(  # pylint: disable=protected-access
      f'{name}_config', path).get_config('size=tiny').model.to_dict()


MASK_CASES = {
    **{f'family:{f}': _variant(f, **_FAMILY.get(f, {})) for f in family_names()},
    **{f'config:{name[:-3]}': _config(name[:-3])
       for name in sorted(os.listdir(os.path.join(_ROOT, 'configs'))) if name.endswith('.py')},
    **{f'attention:{k}': _attention(k) for k in attention_registry.kinds()},
    **{f'attention:synthesizer:{m}': _attention('synthesizer', mode=m)
       for m in ('random', 'factorized_random', 'factorized_dense')},
    'position:llama:shaw': _variant('llama', position=dict(kind='shaw')),
    'position:llama:t5': _variant('llama', position=dict(kind='t5')),
    'position:t5:shaw': _variant('t5', position=dict(kind='shaw')),
    'position:t5:learned': _variant('t5', position=dict(kind='learned')),
    'moe:switch': _variant('mixtral', moe=dict(num_experts=2, top_k=1, router='switch')),
    'moe:hash': _variant('mixtral', moe=dict(num_experts=2, top_k=1, router='hash')),
    'moe:soft': _variant('bert', moe=dict(num_experts=2, top_k=1, router='soft')),
    'moe:gpt2_every_2': _variant('gpt2', num_layers=4, moe=dict(num_experts=2, top_k=1, every=2)),
    'norm:scalenorm': _variant('gpt2', norm='scalenorm'),
    'rnn:lstm': _variant('rnn', rnn=dict(cell='lstm')),
}


def _leaves_by_path(tree):
  """{path: leaf} with nnx.Variables unwrapped, for trees of Variables or of plain values."""
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return {path_str(p): (v.get_value() if is_var(v) else v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]}


def _decisions(params):
  """The optimizer's decisions per parameter path, in the frozen table's encoding."""
  total = opt_lib.num_layers(params)
  decayed = _leaves_by_path(opt_lib.decay_mask(params))
  decayed_no_embed = _leaves_by_path(opt_lib.decay_mask(params, decay_embeddings=False))
  out = {}
  for path, scale in _leaves_by_path(opt_lib.layerwise_lr_scales(params, 0.5)).items():
    d = 'D' if decayed_no_embed[path] else 'E' if decayed[path] else '-'
    power = np.round(np.log2(np.ravel(np.asarray(scale, np.float64))) * -1).astype(int)
    if (power == 0).all():
      lr = '1'
    elif (power == total + 1).all():
      lr = 'emb'
    else:
      lr = ','.join(str(total - int(p)) for p in power)
    out[path] = f'{d} {lr}'
  return total, out


with open(os.path.join(os.path.dirname(__file__), 'optimizer_masks.json')) as f:
  _FROZEN = json.load(f)


# Deliberate changes from the frozen table: the synthesizer's per-head biases b1, b2 [N, .] were
# decayed only because their names escaped the old bias regex (its ba, the same kind, was not);
# they now say role='bias'.
_CHANGED = {'attention:synthesizer': {'stack/layers/blocks/0/self_attn/core/b1': '- 0,1',
                                      'stack/layers/blocks/0/self_attn/core/b2': '- 0,1'}}
_CHANGED['attention:synthesizer:factorized_dense'] = _CHANGED['attention:synthesizer']


def test_mask_cases_are_the_frozen_ones():
  assert set(MASK_CASES) == set(_FROZEN['cases'])


@pytest.mark.parametrize('case', sorted(MASK_CASES))
def test_masks_equal_the_frozen_table(case):
  """Weight decay (with and without decay_embeddings) and layer-wise LR, parameter by parameter,
  as decided before masks came from metadata (tests/train/optimizer_masks.json)."""
  want = _FROZEN['tables'][_FROZEN['cases'][case]]
  cfg = ModelConfig.from_dict(MASK_CASES[case]())
  params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, seed=0)), nnx.Param)
  total, got = _decisions(params)
  assert total == want['layers']
  changed = _CHANGED.get(case, {})
  assert set(changed) <= set(want['params'])
  assert got == {**want['params'], **changed}


_RESTAGED = {'stack': 'trunk', 'layers': 'stages', 'blocks': 'units'}


def _restage(params, stages: int):
  """The parameters as a pipeline might hold them: every stacked parameter [G, ...] cut into
  [stages, G / stages, ...] (both dimensions named 'layers'), and the path components 'stack',
  'layers', 'blocks' renamed. Logical names and metadata are kept."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    meta = v.get_metadata()
    names, shape = meta['out_sharding'], v.get_value().shape
    if names and names[0] == 'layers':
      shape = (stages, shape[0] // stages) + shape[1:]
      names = ('layers',) + names
    new = nnx.Param(jax.ShapeDtypeStruct(shape, v.get_value().dtype),
                    **dict(meta, out_sharding=names))
    node = out
    keys = [_RESTAGED.get(str(p.key), str(p.key)) for p in path]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = new
  return out


def test_masks_follow_the_names_not_the_paths():
  """The point of reading metadata: cutting the layer axis into stages and renaming the modules
  (as a pipeline would) leaves every decision where it was."""
  cfg = ModelConfig.from_dict(family_dict(
      'gpt2', **{**_TINY, 'num_layers': 8, 'moe': dict(num_experts=2, top_k=1, every=2)}))
  params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, seed=0)), nnx.Param)
  staged = _restage(params, stages=2)
  assert opt_lib.num_layers(staged) == opt_lib.num_layers(params) == 8
  rename = lambda path: '/'.join(_RESTAGED.get(k, k) for k in path.split('/'))  # noqa: E731
  for decay_embeddings in (True, False):
    want = _leaves_by_path(opt_lib.decay_mask(params, decay_embeddings))
    got = _leaves_by_path(opt_lib.decay_mask(staged, decay_embeddings))
    assert got == {rename(k): v for k, v in want.items()}
  want = _leaves_by_path(opt_lib.layerwise_lr_scales(params, 0.5))
  got = _leaves_by_path(opt_lib.layerwise_lr_scales(staged, 0.5))
  assert sorted(got) == sorted(rename(k) for k in want)
  stacked = 0
  for path, scale in want.items():
    staged_scale = np.asarray(got[rename(path)])
    np.testing.assert_array_equal(staged_scale.reshape(np.shape(scale)), scale)
    if np.ndim(scale):
      stacked += 1
      assert staged_scale.shape[:2] == (2, np.shape(scale)[0] // 2)
  assert stacked > 10
