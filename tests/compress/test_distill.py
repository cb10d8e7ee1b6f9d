"""Knowledge distillation (CATALOG H): the loss against a hand computation, no gradient into
the teacher, and teachers of another task or vocabulary refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.compress import distill
from jaxformer.compress.config import DistillConfig
from jaxformer.config import ConfigError
from jaxformer.models import build_model
from jaxformer.models.common import ModelOutput
from jaxformer.train.experiment import Experiment
from jaxformer.train.step import with_dropout_key
from jaxformer.train.trainer import make_layout

from prune_helpers import batch, tiny_config


def _fake_teacher(tmp_path, **model):
  """A run folder whose config.json describes a teacher (its checkpoint is not read here)."""
  config = tiny_config(model=dict(d_model=48, **model))
  folder = tmp_path / 'teacher'
  os.makedirs(folder / 'checkpoints')
  (folder / 'config.json').write_text(json.dumps(Experiment.from_config(config).to_dict()))
  return str(folder)


def test_loss_equals_hand_computation():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
  y = rng.integers(0, 7, (2, 3))
  mask = np.asarray([[1, 1, 0], [1, 0, 1]], np.float32)
  T, alpha = 2.5, 0.3
  b = {'inputs': y, 'targets': y, 'loss_mask': mask}
  cfg = Experiment.from_config(tiny_config()).model
  loss, metrics = distill.distill_loss(ModelOutput(logits=jnp.asarray(s, jnp.float32)),
                                       jnp.asarray(t, jnp.float32), 'lm', b, cfg,
                                       DistillConfig(teacher='x', temperature=T, alpha=alpha))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  pt = np.exp(log_softmax(t / T))
  kl = (pt * (log_softmax(t / T) - log_softmax(s / T))).sum(-1)
  ce = -np.take_along_axis(log_softmax(s), y[..., None], -1)[..., 0]
  mean = lambda v: (v * mask).sum() / mask.sum()  # noqa: E731
  want = alpha * T ** 2 * mean(kl) + (1 - alpha) * mean(ce)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['kl']), mean(kl), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['nll']), mean(ce), rtol=1e-5)


def test_gradient_does_not_reach_the_teacher(tmp_path):
  # One layer each: the property does not depend on depth, and compiling is the cost here.
  config = tiny_config(distill=dict(teacher=_fake_teacher(tmp_path, num_layers=1),
                                    temperature=2.0, alpha=0.7), model=dict(num_layers=1))
  exp = Experiment.from_config(config)
  teacher = distill.Teacher(exp, make_layout(exp.parallel, jax.devices()[:1]))
  assert teacher.model_cfg.d_model == 48 and exp.model.d_model == 32
  student_def, student_params, student_rest = nnx.split(build_model(exp.model, seed=0),
                                                        nnx.Param, ...)
  teacher_params = nnx.state(build_model(teacher.model_cfg, seed=1), nnx.Param)
  b = batch(0)

  @jax.jit
  def grads(sp, tp):
    def loss(sp, tp):
      model = nnx.merge(student_def, sp, with_dropout_key(student_rest, jax.random.key(0)))
      return teacher.loss(model, tp, 'lm', b, exp.model, deterministic=True)[0]
    return jax.grad(loss, argnums=(0, 1))(sp, tp)

  gs, gt = grads(student_params, teacher_params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(gt))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(gs)) > 0


@pytest.mark.parametrize('model, message', [
    (dict(vocab_size=300), r'model\.vocab_size: student 260, teacher 300'),
])
def test_teacher_of_another_vocabulary_is_refused(tmp_path, model, message):
  exp = Experiment.from_config(tiny_config(distill=dict(teacher=_fake_teacher(tmp_path,
                                                                              **model))))
  with pytest.raises(ConfigError, match=r"compress\.distill\.teacher=.* " + message):
    distill.read_teacher(exp.compress.distill.teacher, exp)


def test_bad_options_name_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r'compress\.distill\.alpha=1\.5 is invalid'):
    Experiment.from_config(tiny_config(distill=dict(teacher='x', alpha=1.5)))
  with pytest.raises(ConfigError, match=r'compress\.distill\.temperature=0\.0 is invalid'):
    Experiment.from_config(tiny_config(distill=dict(teacher='x', temperature=0.0)))
  config = tiny_config(distill=dict(teacher='x'))
  config.train.label_smoothing = 0.1
  with pytest.raises(ConfigError, match=r'train\.label_smoothing=0\.1 is invalid'):
    Experiment.from_config(config)
