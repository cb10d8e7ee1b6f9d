"""Unstructured pruning (CATALOG H): exactly the requested fraction, the gradual schedule
followed step by step, SNIP's saliency, pruned weights staying 0 under AdamW, one device = 8."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from jaxformer.compress import prune as P
from jaxformer.compress.config import PruneConfig
from jaxformer.config import ConfigError
from jaxformer.parallel import state as state_lib
from jaxformer.train import tasks
from jaxformer.train.experiment import Experiment

from prune_helpers import batch, program, put, tiny_config


@functools.cache
def _params(seed=0):
  """Built once for the tests of this file (none changes them)."""
  exp = Experiment.from_config(tiny_config())
  return nnx.state(state_lib._build(exp.model, seed), nnx.Param), exp


def _dead(masks):
  return {k: ~np.asarray(v) for k, v in traverse_util.flatten_dict(masks).items()}


@pytest.mark.parametrize('scope', ['global', 'layer'])
def test_exact_fraction_with_ties(scope):
  params, _ = _params()
  # Quantize the weights to a few levels, so most of them tie: the count must still be exact.
  params = jax.tree.map(lambda x: jnp.round(x * 8) / 8, params)
  cfg = PruneConfig(method='magnitude', sparsity=0.3, scope=scope)
  pruner = P.Pruner(cfg, params)
  out = P.prune_once(params, cfg)
  flat = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(out)}
  before = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  total = sum(flat[p].size for p in pruner.targets)
  assert total == pruner.size()
  masks = pruner.new_masks(pruner.scores(params, pruner.init_masks()), 0)
  dead = _dead(masks)
  for p in pruner.targets:  # prune_once zeroes exactly the masked weights, keeps the rest
    assert np.all(flat[p][dead[p]] == 0) and np.array_equal(flat[p][~dead[p]],
                                                            before[p][~dead[p]])
  if scope == 'global':
    assert sum(int(d.sum()) for d in dead.values()) == P.count(0.3, total)
    # The kept weights are the largest: min kept |w| >= max pruned |w|.
    kept = np.concatenate([np.abs(before[p][~dead[p]]) for p in dead])
    gone = np.concatenate([np.abs(before[p][dead[p]]) for p in dead])
    assert kept.min() >= gone.max()
  else:
    for p, batch_axes in pruner.targets.items():
      rows = dead[p].reshape(int(np.prod([dead[p].shape[i] for i in batch_axes])), -1)
      assert np.all(rows.sum(1) == P.count(0.3, rows.shape[1]))
  # Not pruned: norms, and the embedding (embeddings=False).
  assert not any('norm' in '.'.join(p) or 'embed' in p[0] for p in pruner.targets)
  assert ('embedder', 'embed', 'embedding') in P.eligible(params, embeddings=True)


def test_ties_go_by_index():
  keep = np.asarray(P.keep_top(jnp.asarray([[1.0, 0.0, 0.0, 1.0, 0.0]]), 2))
  assert keep.tolist() == [[True, False, False, True, True]]


GRADUAL = dict(method='magnitude', sparsity=0.6, scope='layer', schedule='gradual', start=1,
               end=5, every=2, initial_sparsity=0.1)


def _run_gradual(mesh, devices, steps):
  """Trains `steps` steps under GRADUAL, checking after each that the sparsity is the
  schedule's and that the pruned weights are exactly 0; returns (params, masks)."""
  prog = program(tiny_config(prune=GRADUAL, mesh=mesh), devices)
  pruner = prog.pruner
  s_f, s_i, t0, n_dt = 0.6, 0.1, 1, 4
  state = prog.init_state()
  for i in range(steps):
    state, _ = prog.train_step(state, put(prog, batch(i)))
    # Events at t = 1, 3, 5; step i ran the event at i if any, so the last event <= i holds.
    events = [t for t in (1, 3, 5) if t <= i]
    s_t = 0.0 if not events else s_f + (s_i - s_f) * (1 - (events[-1] - t0) / n_dt) ** 3
    dead = _dead(state['prune_masks'])
    for p, d in dead.items():  # scope 'layer': every layer slice loses round(s_t * n)
      rows = d.reshape(d.shape[0], -1)
      assert np.all(rows.sum(1) == P.count(s_t, rows.shape[1])), (i, p)
    assert sum(int(d.sum()) for d in dead.values()) == pruner.expected_zeros(i)
    flat = {tuple(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(jax.device_get(state['params']))}
    # The pruned weights are exactly 0 after AdamW with weight decay 0.1.
    assert all(np.all(flat[p][d] == 0) for p, d in dead.items()), i
  return jax.device_get((state['params'], state['prune_masks']))


MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}


def test_gradual_schedule_is_followed_on_a_sharded_mesh():
  _run_gradual(MESH, None, 6)


@pytest.mark.slow  # two more train-step compilations (~25 s on a quiet 2-core CPU)
def test_sharded_pruning_equals_one_device():
  p8, m8 = _run_gradual(MESH, None, 4)
  p1, m1 = _run_gradual(None, jax.devices()[:1], 4)
  assert jax.tree.all(jax.tree.map(np.array_equal, m8, m1))
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _check_snip(dead, grads, params, size):
  g = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  w = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  saliency = {p: np.abs(g[p] * w[p]) for p in dead}
  kept = np.concatenate([saliency[p][~d] for p, d in dead.items()])
  gone = np.concatenate([saliency[p][d] for p, d in dead.items()])
  assert gone.size == P.count(0.5, size)
  # float32 gradients of the jitted step and of the reference may differ in the last bits.
  assert kept.min() >= gone.max() * (1 - 1e-4)


def _loss_grad(prog, b):
  def loss(params):
    model = nnx.merge(prog.graphdef, params, prog.rest)
    return tasks.compute_loss(model, 'lm', b, prog.exp.model, tasks.LossConfig(),
                              deterministic=True)[0]
  return jax.jit(jax.grad(loss))


def test_snip_keeps_the_largest_gradient_times_weight():
  prog = program(tiny_config(prune=dict(method='snip', sparsity=0.5)), jax.devices()[:1])
  pruner = prog.pruner
  params, _ = _params()
  grads = _loss_grad(prog, batch(0))(params)
  masks = pruner.new_masks(pruner.scores(params, pruner.init_masks(), grads), 0)
  _check_snip(_dead(masks), grads, params, pruner.size())


@pytest.mark.slow  # a train-step compilation (~12 s on a quiet 2-core CPU)
def test_snip_in_the_train_step():
  prog = program(tiny_config(prune=dict(method='snip', sparsity=0.5)), jax.devices()[:1])
  state = prog.init_state()
  params0 = jax.device_get(state['params'])
  grads = _loss_grad(prog, batch(0))(params0)
  state, _ = prog.train_step(state, put(prog, batch(0)))
  _check_snip(_dead(state['prune_masks']), grads, params0, prog.pruner.size())


@pytest.mark.parametrize('field, value, message', [
    ('sparsity', 1.0, r'compress\.prune\.sparsity=1\.0 is invalid: .*\[0, 1\)'),
    ('sparsity', -0.1, r'compress\.prune\.sparsity=-0\.1 is invalid'),
    ('scope', 'row', r"compress\.prune\.scope='row' is invalid: allowed values"),
    ('end', 4, r'compress\.prune\.end=4 is invalid: .*multiple of every=3'),
])
def test_bad_options_name_the_field(field, value, message):
  cfg = dict(method='magnitude', schedule='gradual', start=0, end=6, every=3)
  cfg[field] = value
  with pytest.raises(ConfigError, match=message):
    Experiment.from_config(tiny_config(prune=cfg))


def test_pruning_needs_full_finetuning():
  config = tiny_config(prune=dict(method='magnitude'))
  config.finetune.method = 'lora'
  with pytest.raises(ConfigError, match=r"compress\.prune\.method='magnitude' is invalid: needs "
                     r"finetune\.method='full'"):
    Experiment.from_config(config)
