"""Knowledge distillation as a trainer mode (Hinton et al. 2015; CATALOG H).

    loss = alpha T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, labels)

with s the student's logits, t the teacher's (`jaxformer.train.losses.distillation_loss`; the
T^2 keeps the soft-target gradients on the scale of the hard-target ones), averaged over the
tokens the task's loss counts (its loss mask). Set by `compress.distill` (teacher, temperature,
alpha); every task whose model returns logits over the labels works (lm, mlm, seq2seq,
span_corruption, denoise, classification).

The teacher is a jaxformer run folder: its config.json gives its model (any family and size)
and its newest readable checkpoint its parameters. It must share the student's task, tokenizer
and vocabulary (or, for classification, its number of labels); otherwise it is refused before
anything is compiled. Its parameters are read once per start straight into their shardings on
the student's mesh (`jaxformer.finetune.init_from`), passed to the jitted train step as the
state entry 'teacher' and returned unchanged: they are not in the optimizer, not checkpointed,
and the loss sees them through `stop_gradient`. The teacher runs deterministically (no
dropout) inside the step, on the same batch as the student.
"""

from __future__ import annotations

import functools
import json
import os

import jax
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig, fail
from jaxformer.parallel import state as state_lib
from jaxformer.train import losses, tasks
from jaxformer.train.step import with_dropout_key

FIELD = 'compress.distill.teacher'


def check(exp) -> None:
  """What distillation cannot do with this experiment, refused at config time (the teacher's
  own files are read when training starts: `Teacher.model_cfg`)."""
  t = exp.train
  if exp.data.task == 'rtd':
    fail('data.task', exp.data.task, 'cannot be distilled (ELECTRA trains a generator and a '
         'discriminator at once); use another task or drop compress.distill')
  if exp.parallel.axis_size('stage') > 1:
    fail('parallel.mesh.stage', exp.parallel.axis_size('stage'),
         'must be 1 with compress.distill: the teacher runs beside the student, not in '
         'pipeline stages')
  for name in ('label_smoothing', 'z_loss'):
    if getattr(t, name):
      fail(f'train.{name}', getattr(t, name),
           'must be 0 with compress.distill: the hard-label term of the distillation loss is '
           'the plain cross entropy')


def read_teacher(path: str, exp) -> ModelConfig:
  """The teacher run's model config, after checking that it shares the student's task and
  vocabulary; raises ConfigError / FileNotFoundError naming the field."""
  from jaxformer.finetune import init_from  # pylint: disable=import-outside-toplevel
  src = init_from.resolve(path, FIELD)
  if src.kind != 'jaxformer':
    raise ConfigError(f'{FIELD}={path!r} is invalid: the teacher must be a jaxformer run folder '
                      '(fine-tune an imported model into one first)')
  with open(os.path.join(src.path, 'config.json')) as f:
    config = json.load(f)
  model = ModelConfig.from_dict(config['model'])
  data = config.get('data', {})
  theirs = {'data.task': data.get('task'), 'data.tokenizer': data.get('tokenizer'),
            'model.vocab_size': model.vocab_size}
  ours = {'data.task': exp.data.task, 'data.tokenizer': exp.data.tokenizer,
          'model.vocab_size': exp.model.vocab_size}
  if exp.data.task == 'classification':
    theirs['model.num_labels'], ours['model.num_labels'] = model.num_labels, exp.model.num_labels
  differ = [f'{k}: student {ours[k]!r}, teacher {theirs[k]!r}' for k in ours
            if theirs[k] != ours[k]]
  if differ:
    raise ConfigError(f'{FIELD}={path!r} is invalid: the teacher must share the student\'s task '
                      f'and vocabulary, and these differ: {"; ".join(differ)}')
  return model


class Teacher:
  """The teacher of `exp.compress.distill` on `layout`. Nothing is read until a property is
  first used (the train step, `load`), so evaluating a distilled run needs no teacher."""

  def __init__(self, exp, layout):
    self.exp, self.layout = exp, layout
    self.cfg = exp.compress.distill

  @functools.cached_property
  def model_cfg(self) -> ModelConfig:
    return read_teacher(self.cfg.teacher, self.exp)

  @functools.cached_property
  def _split(self):
    return nnx.split(state_lib.abstract_model(self.model_cfg), nnx.Param, ...)

  @property
  def graphdef(self):
    return self._split[0]

  @functools.cached_property
  def shardings(self):
    return self.layout.state_shardings(self._split[1])

  @functools.cached_property
  def rest(self):
    """The teacher's non-parameter variables (RNG streams), made in place."""
    cfg = self.model_cfg
    return jax.jit(lambda: nnx.split(state_lib._build(cfg, 0), nnx.Param, ...)[2],  # pylint: disable=protected-access
                   out_shardings=self.layout.state_shardings(self._split[2]))()

  def load(self) -> nnx.State:
    """The teacher's parameters from its newest readable checkpoint, in their shardings."""
    from jaxformer.finetune import init_from  # pylint: disable=import-outside-toplevel
    target = state_lib.abstract_with(self._split[1], self.shardings)
    params, fresh = init_from.load_initial_params(self.cfg.teacher, self.model_cfg, target,
                                                  self.layout, field=FIELD)
    assert not fresh, fresh  # the teacher's own config: every parameter is in its checkpoint
    return params

  def loss(self, model, teacher_params, task: str, batch: dict, model_cfg: ModelConfig, *,
           deterministic: bool):
    """(distillation loss, metrics) of the student `model` on `batch`. Metrics: loss, kl (at
    T, before T^2), the student's nll / accuracy / num_tokens, and its MoE losses."""
    # Fresh Variables (at the gradient's trace level) whose values the gradient cannot enter.
    frozen = jax.tree.map(jax.lax.stop_gradient, teacher_params)
    # Deterministic: the stream keys only keep the graph well formed (and new, at this trace).
    teacher = nnx.merge(self.graphdef, frozen, with_dropout_key(self.rest, jax.random.key(0)))
    args, kwargs = tasks.model_inputs(task, batch)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out = model(*args, deterministic=deterministic, **kwargs)
    target_logits = teacher(*args, deterministic=True, **kwargs).logits
    return distill_loss(out, target_logits, task, batch, model_cfg, self.cfg)


def distill_loss(out, teacher_logits, task: str, batch: dict, model_cfg: ModelConfig, cfg):
  """The distillation loss of a student's output `out` against `teacher_logits`."""
  targets, mask = tasks.targets_and_mask(task, batch)
  loss, m = losses.distillation_loss(out.logits, teacher_logits, targets,
                                     temperature=cfg.temperature, alpha=cfg.alpha, mask=mask)
  _, metrics = losses.cross_entropy(out.logits, targets, mask=mask)
  metrics = dict(metrics, loss=loss, kl=m['kl'])
  return tasks._with_aux(loss, metrics, out.aux, model_cfg)  # pylint: disable=protected-access
