"""LoRA, QLoRA and gradual unfreezing through the trainer's ParamPlan (CATALOG K oracles):
the trainable count is the formula, LoRA starts equal to the base and its update is the
low-rank path x W0 + s (x A) B, only the intended parameters change and only they are
checkpointed, QLoRA trains on int4 codes, unfreezing follows its schedule."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.finetune import lora
from jaxformer.models import family_dict
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import stdlib_bytes
from jaxformer.train.trainer import Trainer

D, L, N, KV, H, F, V = 32, 2, 4, 2, 8, 64, 260


def config(steps=3, **finetune):
  model = family_dict('llama', vocab_size=V, max_length=32, d_model=D, num_layers=L,
                      attention=dict(num_heads=N, num_kv_heads=KV), ffn=dict(hidden_dim=F),
                      tie_embeddings=False)
  train = dict(batch_size=4, steps=steps, log_every=1, eval_every=1000, eval_batches=1,
               checkpoint_every=1000, test_batches=0, sample_tokens=0, progress=False,
               async_checkpoint=False, tensorboard=False)
  optim = dict(optimizer='adamw', lr=1e-2, weight_decay=0.1, schedule='constant')
  return default_config(model=model, data=stdlib_bytes('lm', seq_len=32), optim=optim,
                        train=train, finetune=finetune)


def make(cfg, workdir, devices=1):
  return Trainer(cfg, workdir, devices=jax.devices()[:devices])


def flat(tree):
  return {lora.path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_lora_counts_starts_at_base_and_trains_only_adapters(tmp_path):
  r = 4
  trainer = make(config(method='lora', lora=dict(rank=r, alpha=8.0, targets=('q', 'v', 'o'))),
                    str(tmp_path / 'run'))
  program = trainer.program
  # q: [L, D, N, H], v: [L, D, KV, H], o: [L, N, H, D] -> L r (in + out) each.
  expected = L * r * ((D + N * H) + (D + KV * H) + (N * H + D))
  assert program.num_trainable == expected
  assert set(trainer.state['params']['lora']) == {
      'stack.layers.blocks.0.self_attn.wq', 'stack.layers.blocks.0.self_attn.wv',
      'stack.layers.blocks.0.self_attn.wo'}
  # Under 'lora' the frozen tree holds every base parameter (no train_also, no fresh head).
  base = flat(trainer.state['frozen']['params'])
  before = flat(trainer.model_params())
  assert before.keys() == base.keys()
  for k in base:  # B = 0: the adapted model is the base model, bit for bit
    np.testing.assert_array_equal(before[k], base[k], err_msg=k)
  frozen_before = flat(trainer.state['frozen']['params'])
  factors_before = jax.tree.map(np.asarray, trainer.state['params']['lora'])
  trainer.run()
  after = flat(trainer.model_params())
  for k, v in flat(trainer.state['frozen']['params']).items():
    np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)
  changed = {k for k in base if not np.array_equal(after[k], base[k])}
  assert changed == set(trainer.state['params']['lora'])
  moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b),
                       trainer.state['params']['lora'], factors_before)
  assert all(jax.tree.leaves(moved))
  # The checkpoint holds the factors and their optimizer state only, never the base.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'run'), async_save=False, read_only=True)
  saved = ckpt._manager.restore(ckpt.latest_step())  # pylint: disable=protected-access
  ckpt.close()
  keys = ckpt_lib.flatten(saved['state'])
  assert not any('frozen' in k for k in keys)
  assert not any(k.startswith('params/base/') for k in keys)
  n_saved_params = sum(np.size(v) for k, v in keys.items() if k.startswith('params/'))
  assert n_saved_params == expected


def test_lora_dropout_site_is_the_dropped_low_rank_path():
  """With the merged weight W0 + s A B and the path attached, the projection site computes
  x W0 + s (drop(x) A) B, drop(x) = x m / (1 - p) with m the key's Bernoulli(1 - p) mask, for a
  matrix with two input axes (the attention output wo)."""
  from jaxformer.attention.attention import Attention  # pylint: disable=import-outside-toplevel
  from jaxformer.layers import linear  # pylint: disable=import-outside-toplevel
  cfg = family_dict('llama', d_model=D, attention=dict(num_heads=N, num_kv_heads=KV))
  from jaxformer.config import ModelConfig  # pylint: disable=import-outside-toplevel
  attn = Attention(ModelConfig.from_dict(cfg), causal=True, rngs=nnx.Rngs(0))
  k = jax.random.split(jax.random.key(1), 4)
  w0 = attn.wo[...]
  a, b = jax.random.normal(k[0], (N, H, 3)), jax.random.normal(k[1], (3, D))
  x = jax.random.normal(k[2], (2, 5, N, H))
  p, s = 0.25, 0.5
  axes = ((), (0, 1), (2,))
  lora.attach_dropout_paths(attn, {'wo': {'a': nnx.Param(a), 'b': nnx.Param(b)}}, {'wo': axes},
                            k[3], p, s)
  y = linear.project(attn, 'wo', x, w0 + lora.delta(a, b, axes, s), 2)
  m = jax.random.bernoulli(jax.random.fold_in(k[3], 0), 1 - p, x.shape)
  dropped = x * m / (1 - p)
  explicit = (jnp.einsum('btnh,nhd->btd', x, w0)
              + s * jnp.einsum('btr,rd->btd', jnp.einsum('btnh,nhr->btr', dropped, a), b))
  chex.assert_trees_all_close(y, explicit, atol=1e-5, rtol=1e-5)
  assert 0.6 < float(m.mean()) < 0.9  # the mask really drops about p of the inputs


def test_lora_dropout_paths_run_per_layer_in_scanned_and_unrolled_stacks():
  """Attached to a stacked model, each layer's slice of A, B and its own key reach that layer:
  the scanned and the unrolled stack give the same logits, which differ from the merged model's
  (dropout acts) and from those with every layer given layer 0's key (the keys are per layer)."""
  from jaxformer.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from jaxformer.models import build_model  # pylint: disable=import-outside-toplevel
  cfg = dict(family_dict('llama', vocab_size=V, max_length=32, d_model=D, num_layers=L,
                         attention=dict(num_heads=N, num_kv_heads=KV), ffn=dict(hidden_dim=F)))
  ids = jax.random.randint(jax.random.key(2), (2, 16), 0, V)
  key = jax.random.key(3)

  def logits(scan, same_keys=False, attach=True):
    model = build_model(ModelConfig.from_dict(dict(cfg, scan_layers=scan)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat_params = lora.flat_params(params)
    targets = lora.select_targets(flat_params, ('q', 'o', 'ffn'), 4)
    factors = lora.lora_factors(flat_params, targets, 4, jax.random.key(4))
    for i, f in enumerate(factors.values()):  # a trained B: the path contributes
      f['b'] = f['b'].replace(0.1 * jax.random.normal(jax.random.key(5 + i), f['b'].shape))
    merged = lora.apply({k: flat_params[k].get_value() for k in targets},
                        {k: {n: f[n].get_value() for n in f} for k, f in factors.items()},
                        targets, 2.0)
    for k, v in merged.items():
      flat_params[k].set_value(v)
    model = nnx.merge(graphdef, params, rest)
    if attach:
      lora.attach_dropout_paths(model, factors, targets, key, 0.5, 2.0)
      if same_keys:
        for k in targets:
          m, name = lora.module_at(model, k)
          v = getattr(m, name + '_lora_key')
          v.set_value(jnp.broadcast_to(v.get_value()[0], v.get_value().shape))
    return np.asarray(nnx.jit(lambda m: m(ids).logits)(model))

  scanned = logits(True)
  np.testing.assert_allclose(logits(False), scanned, atol=1e-5, rtol=1e-5)
  assert np.abs(logits(True, attach=False) - scanned).max() > 1e-3
  assert np.abs(logits(True, same_keys=True) - scanned).max() > 1e-3


def test_lora_dropout_trains_and_only_differs_through_the_path(tmp_path):
  """LoRA with dropout: the first step's loss is the dropout-free run's (B = 0: the path adds
  nothing yet), later ones differ (the path's gradient saw dropped inputs), the loss falls, and
  evaluation (no dropout) runs on the merged weights."""
  from jaxformer.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  losses = {}
  for p in (0.0, 0.3):
    workdir = str(tmp_path / str(p))
    trainer = make(config(steps=4, method='lora', lora=dict(rank=4, alpha=8.0, dropout=p,
                                                            targets=('q', 'v', 'o', 'ffn'))),
                   workdir)
    result = trainer.run()
    losses[p] = [r['loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
                 if 'loss' in r]
    assert math.isfinite(result['eval']['loss'])
  assert losses[0.3][0] == pytest.approx(losses[0.0][0], abs=1e-6)
  assert all(abs(a - b) > 1e-5 for a, b in zip(losses[0.3][1:], losses[0.0][1:]))
  assert losses[0.3][-1] < losses[0.3][0]


def test_lora_update_is_the_low_rank_path():
  """x . (W0 + s A B) == x . W0 + s (x . A) . B for a matrix with two input axes (wo)."""
  k = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(k[0], (L, N, H, D))
  a = jax.random.normal(k[1], (L, N, H, 3))
  b = jax.random.normal(k[2], (L, 3, D))
  x = jax.random.normal(k[3], (L, 5, N, H))
  axes = lora.matrix_axes(('layers', 'heads', 'head_dim', 'embed'))
  assert axes == ((0,), (1, 2), (3,))
  merged = w + lora.delta(a, b, axes, 0.5)
  y = jnp.einsum('lbnh,lnhd->lbd', x, merged)
  explicit = (jnp.einsum('lbnh,lnhd->lbd', x, w)
              + 0.5 * jnp.einsum('lbr,lrd->lbd', jnp.einsum('lbnh,lnhr->lbr', x, a), b))
  chex.assert_trees_all_close(y, explicit, atol=1e-5, rtol=1e-5)


def test_exported_merge_equals_the_lora_model(tmp_path):
  trainer = make(config(steps=2, method='lora', lora=dict(rank=2, targets=('attention',))),
                    str(tmp_path / 'run'))
  trainer.run()
  lora_eval = trainer.evaluate('validation', 1)
  merged = trainer.model_params()  # one plain tree, W0 + s A B folded in
  plain = make(config(steps=2), str(tmp_path / 'plain'))
  plain.state['params'] = jax.device_put(merged, plain.program.param_shardings)
  plain_eval = plain.evaluate('validation', 1)
  plain.close()
  assert abs(plain_eval['loss'] - lora_eval['loss']) <= 1e-5 * max(1.0, lora_eval['loss'])


def test_qlora_trains_on_int4_codes(tmp_path):
  trainer = make(config(steps=6, method='qlora',
                           lora=dict(rank=4, targets=('ffn',), base_bits=4, base_group_size=16)),
                    str(tmp_path / 'run'))
  codes = trainer.state['frozen']['codes']
  assert set(codes) == {'stack.layers.blocks.0.ffn.wi_gate', 'stack.layers.blocks.0.ffn.wi_up',
                        'stack.layers.blocks.0.ffn.wo'}
  for q in codes.values():
    assert q.qvalue.dtype == jnp.int4
  base = flat(jax.jit(trainer.program._model_params)(None))  # pylint: disable=protected-access
  start = flat(trainer.model_params())
  for k, q in codes.items():  # the base the model sees is within half a step of the weights
    step = np.repeat(np.asarray(q.scale), 16, axis=1).reshape(base[k].shape)
    assert np.all(np.abs(start[k] - base[k]) <= step / 2 + 1e-6), k
  first = trainer.evaluate('validation', 1)['loss']
  codes_before = [np.asarray(x) for x in jax.tree.leaves(codes)]  # the state is donated
  trainer.run()
  assert trainer.evaluate('validation', 1)['loss'] < first
  for q, q0 in zip(jax.tree.leaves(trainer.state['frozen']['codes']), codes_before):
    np.testing.assert_array_equal(np.asarray(q), q0)


def test_gradual_unfreezing_follows_its_schedule(tmp_path):
  # Groups from the top: 1 = head and final norm, 2 = + the last layer, 3 = + layer 0,
  # 4 = + the embeddings.
  trainer = make(config(steps=2, unfreeze=((0, 1), (1, 2))), str(tmp_path / 'run'))
  before = flat(trainer.state['params'])
  trainer.run()
  after = flat(trainer.state['params'])
  for k in before:
    moved = np.any(after[k] != before[k], axis=tuple(range(1, before[k].ndim))) \
        if k.startswith('stack.') else np.any(after[k] != before[k])
    if k.startswith('stack.'):  # [layers, ...]: layer 1 trained at step 2, layer 0 never
      assert moved.tolist() == [False, True], k
    elif k.startswith('embedder.'):
      assert not moved, k
    else:
      assert moved, k


@pytest.mark.parametrize('finetune, match', [
    (dict(method='lora', lora=dict(targets=('nonexistent',))), 'matches no matrix'),
    (dict(method='lora', lora=dict(rank=33, targets=('q',))), r'rank=33 .* at most .* = 32'),
    (dict(method='lora', lora=dict(dropout=1.0)), 'finetune.lora.dropout=1.0 .* in .0, 1.'),
    (dict(method='lora', lora=dict(dropout=0.1, targets=('q', 'embed'))),
     r"dropout=0.1 .* \['embedder.embed.embedding'\] are not computed through a projection"),
    (dict(method='qlora', lora=dict(base_group_size=7, targets=('q',))),
     'base_group_size=7 does not divide the input size 32'),
    (dict(method='modules'), 'model.peft'),
    (dict(method='sideways'), 'finetune.method'),
    (dict(method='lora', unfreeze=((0, 1),)), "needs finetune.method='full'"),
    (dict(unfreeze=((5, 1),)), 'must start at step 0'),
])
def test_bad_finetune_options_name_the_field(tmp_path, finetune, match):
  with pytest.raises((ConfigError, ValueError), match=match):
    make(config(**finetune), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not os.listdir(
      tmp_path / 'run' / 'checkpoints')


def test_lora_count_formula_is_exact_for_experts():
  """MoE experts: one factor pair per (layer, expert)."""
  params = {'w': nnx.Param(jnp.zeros((2, 3, 8, 16)), eager_sharding=False,
                           out_sharding=('layers', 'expert', 'embed', 'mlp'))}
  chosen = lora.select_targets(params, ('w',), 2)
  assert lora.num_lora_params(params, chosen, 2) == 2 * 3 * 2 * (8 + 16)
  f = lora.lora_factors(params, chosen, 2, jax.random.key(0))['w']
  assert f['a'].get_value().shape == (2, 3, 8, 2) and f['b'].get_value().shape == (2, 3, 2, 16)
  assert 0 < float(jnp.abs(f['a'].get_value()).max()) <= 1 / math.sqrt(8)
  assert not np.any(np.asarray(f['b'].get_value()))


def test_qlora_on_an_fsdp_mesh_equals_one_device(tmp_path):
  """The trainable factors, the frozen base and its int4 codes laid out over 8 devices (FSDP
  with tensor parallelism) train exactly as on one device."""
  losses = {}
  for name, devices, parallel in (('one', 1, {}),
                                  ('mesh', 8, dict(mesh={'fsdp': 4, 'tensor': 2}))):
    cfg = config(steps=2, method='qlora',
                 lora=dict(rank=2, targets=('attention', 'ffn'), base_group_size=16))
    cfg.train.batch_size = 8
    for k, v in parallel.items():
      cfg.parallel[k] = dict(cfg.parallel[k], **v)
    trainer = make(cfg, str(tmp_path / name), devices=devices)
    if devices > 1:
      spec = trainer.state['frozen']['codes']['stack.layers.blocks.0.ffn.wo'].qvalue.sharding.spec
      assert any(a is not None for a in spec), spec
    result = trainer.run()
    losses[name] = (result['last_train']['loss'], trainer.evaluate('validation', 1)['loss'])
  np.testing.assert_allclose(losses['mesh'], losses['one'], rtol=1e-5)


def test_modules_method_trains_only_the_peft_parameters(tmp_path):
  """finetune.method='modules' with adapters, prefixes and a prompt (model.peft): the
  trainable set is exactly those parameters (their formula counts), only they move, the base
  stays frozen and out of the checkpoint."""
  from jaxformer.layers import peft  # pylint: disable=import-outside-toplevel
  cfg = config(steps=3, method='modules')
  cfg.model.peft.adapter_dim = 4
  cfg.model.peft.prefix_length = 2
  cfg.model.peft.prompt_length = 2
  cfg.data.packing = 'none'
  cfg.data.seq_len = 24
  trainer = make(cfg, str(tmp_path / 'run'))
  want = peft.expected_counts(trainer.exp.model)
  assert trainer.program.num_trainable == sum(want.values()) > 0
  assert set(lora.flat_params(trainer.state['params']['base'])) == {
      k for k, v in trainer.program.plan.templates.items()
      if v.get_metadata().get('role') in ('adapter', 'prefix', 'prompt')}
  base = flat(trainer.state['frozen']['params'])
  trainer.run()
  for k, v in flat(trainer.state['frozen']['params']).items():
    np.testing.assert_array_equal(v, base[k], err_msg=k)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'run'), async_save=False, read_only=True)
  saved = ckpt._manager.restore(ckpt.latest_step())  # pylint: disable=protected-access
  ckpt.close()
  n = sum(np.size(v) for k, v in ckpt_lib.flatten(saved['state']).items()
          if k.startswith('params/'))
  assert n == sum(want.values())
