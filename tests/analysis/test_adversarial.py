"""FGSM and PGD on the input embeddings, and adversarial training (CATALOG I)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from analysis_models import tiny, tokens
from jaxformer.analysis import adversarial, inputs
from jaxformer.config import ConfigError
from jaxformer.train import tasks
from jaxformer.train.experiment import Experiment, default_config
from jaxformer.train.step import make_train_step


def _lm_loss(model):
  x = tokens()
  batch = {'inputs': x, 'targets': jnp.roll(x, -1, axis=1)}
  fn = inputs.scalar_function(model, lambda m: tasks.compute_loss(
      m, 'lm', batch, model.cfg, tasks.LossConfig(), deterministic=True)[0])
  return jax.jit(fn), inputs.delta_shape(model, x)


def test_fgsm_raises_the_loss_and_pgd_stays_in_the_ball_above_it():
  loss, shape = _lm_loss(tiny())
  clean = float(loss(jnp.zeros(shape)))
  eps = 0.05
  d_fgsm = jax.jit(adversarial.fgsm, static_argnums=(0, 1, 2))(loss, shape, eps)
  pgd = jax.jit(adversarial.pgd, static_argnums=(0, 1, 2, 3))
  d_pgd = pgd(loss, shape, eps, 10)
  d_rand = pgd(loss, shape, eps, 10, key=jax.random.key(0))
  assert float(loss(d_fgsm)) > clean + 1e-3
  assert float(jnp.max(jnp.abs(d_fgsm))) == pytest.approx(eps)
  for d in (d_pgd, d_rand):  # exactly inside the L_inf ball of radius float32(eps)
    assert d.dtype == jnp.float32 and jnp.max(jnp.abs(d)) <= jnp.float32(eps)
  assert float(loss(d_pgd)) >= float(loss(d_fgsm))


def test_bad_attack_options_are_refused():
  loss, shape = _lm_loss(tiny())
  with pytest.raises(ConfigError, match='must be > 0'):
    adversarial.fgsm(loss, shape, 0.0)
  with pytest.raises(ConfigError, match='at least 1 step'):
    adversarial.pgd(loss, shape, 0.1, 0)


def _config(**train):
  model = dict(family='decoder', d_model=16, num_layers=1, vocab_size=32, max_length=8,
               attention={'num_heads': 2}, ffn={'hidden_dim': 32})
  return default_config(model=model, data={'task': 'lm', 'seq_len': 8},
                        train=dict(batch_size=8, steps=10, **train))


@pytest.mark.parametrize('train, field', [
    (dict(adversarial='fgm'), 'train.adversarial'),
    (dict(adversarial='pgd', adversarial_eps=0.0), 'train.adversarial_eps'),
    (dict(adversarial='pgd', adversarial_steps=0), 'train.adversarial_steps'),
    (dict(adversarial='fgsm', adversarial_weight=1.5), 'train.adversarial_weight'),
])
def test_bad_training_options_are_refused(train, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    Experiment.from_config(_config(**train))


def test_adversarial_training_needs_token_embeddings():
  c = _config(adversarial='fgsm')
  c.model.family = 'vit'
  c.model.image_size, c.model.patch_size, c.model.num_labels = 8, 4, 2
  c.data.task = 'classification'
  with pytest.raises(ConfigError, match='train.adversarial.*no'):
    Experiment.from_config(c)


@pytest.mark.parametrize('attack', ['fgsm', pytest.param('pgd', marks=pytest.mark.slow)])
def test_adversarial_training_trains(attack):
  """The loss falls over a few steps and the adversarial term is >= the clean loss."""
  exp = Experiment.from_config(_config(adversarial=attack, adversarial_eps=0.05,
                                       adversarial_steps=2))
  model = tiny()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  step = jax.jit(make_train_step(graphdef, rest, task='lm', model_cfg=model.cfg,
                                 loss_cfg=tasks.LossConfig.from_train(exp.train), tx=tx,
                                 accum_steps=1, seed=0))
  x = tokens(8, 8)
  batch = {'inputs': x, 'targets': jnp.roll(x, -1, axis=1)}
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  history = []
  for _ in range(10):
    state, m = step(state, batch)
    history.append(m)
  for m in history:
    assert float(m['adversarial_loss']) >= float(m['clean_loss'])
    assert float(m['total_loss']) == pytest.approx(
        0.5 * float(m['clean_loss']) + 0.5 * float(m['adversarial_loss']), rel=1e-5)
  assert float(history[-1]['clean_loss']) < float(history[0]['clean_loss']) - 0.3
