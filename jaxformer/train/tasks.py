"""Objectives: how a batch feeds a model and becomes a loss (CATALOG F6).

A task maps the batch schema of `jaxformer.data` to a model call and a scalar loss plus metrics.
Every loss is a token- (or example-) weighted mean in float32; MoE auxiliary losses are added
with `model.moe.load_balance_weight` and `model.moe.z_loss_weight`.

    lm              decoder: inputs, targets, segment_ids, positions, loss_mask
    mlm             encoder: inputs, targets, loss_mask, segment_ids
    seq2seq         encoder-decoder / RNN: encoder_inputs, decoder_inputs, decoder_targets, ...
    span_corruption the seq2seq schema (T5)
    denoise         the seq2seq schema (BART)
    classification  encoder / ViT: inputs (or images), label
    rtd             ELECTRA (replaced-token detection): the mlm schema; the generator's MLM
                    loss on the masked positions + model.electra.disc_weight x the
                    discriminator's sigmoid cross entropy on every non-padding token
                    (`models/electra.py`). Metrics: loss (that sum), mlm_loss, nll and
                    accuracy (the generator's, on masked tokens), rtd_loss, rtd_accuracy and
                    rtd_tokens (the discriminator's), replaced (fraction of tokens replaced).

Analysis options (`LossConfig.adversarial`, `LossConfig.entropy_metrics`, from `train.*`) wrap
any task's loss: adversarial training on the input embeddings (jaxformer/analysis/adversarial.py:
(1 - w) clean + w adversarial) and the mean attention entropy of every layer as metrics
(jaxformer/analysis/entropy.py). Off (the default), neither adds anything to the step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxformer.analysis import adversarial
from jaxformer.analysis import entropy as entropy_lib
from jaxformer.analysis import maps as maps_lib
from jaxformer.config import ModelConfig, check_choice
from jaxformer.models import registry
from jaxformer.train.losses import cross_entropy, replaced_token_detection_loss, weighted_mean

TASKS = ('lm', 'mlm', 'seq2seq', 'span_corruption', 'denoise', 'classification', 'rtd')
SEQ2SEQ = registry.SEQ2SEQ_TASKS


@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  adversarial: adversarial.AdversarialConfig = adversarial.AdversarialConfig()
  entropy_metrics: bool = False
  activation_entropy: bool = False

  @classmethod
  def from_train(cls, t) -> 'LossConfig':
    """The loss settings of a `TrainConfig`."""
    return cls(label_smoothing=t.label_smoothing, z_loss=t.z_loss,
               adversarial=adversarial.AdversarialConfig(
                   attack=t.adversarial, eps=t.adversarial_eps, steps=t.adversarial_steps,
                   step_size=t.adversarial_step_size, weight=t.adversarial_weight,
                   random_start=t.adversarial_random_start),
               entropy_metrics=t.entropy_metrics, activation_entropy=t.activation_entropy)


def check_task(task: str, model: ModelConfig) -> None:
  check_choice('data.task', task, TASKS)
  allowed = model.family_spec.tasks
  if task not in allowed:
    raise ValueError(f'data.task={task!r} does not fit model.family={model.family!r}: '
                     f'allowed tasks are {list(allowed)}')


def model_inputs(task: str, batch: dict) -> tuple[tuple, dict]:
  """(positional args, keyword args) for the model call."""
  if task == 'lm':
    return (batch['inputs'],), dict(segment_ids=batch.get('segment_ids'),
                                    positions=batch.get('positions'))
  if task in SEQ2SEQ:
    return (batch['encoder_inputs'], batch['decoder_inputs']), dict(
        encoder_segment_ids=batch.get('encoder_segment_ids'),
        decoder_segment_ids=batch.get('decoder_segment_ids'))
  if 'images' in batch:
    return (batch['images'],), {}
  return (batch['inputs'],), dict(segment_ids=batch.get('segment_ids'),
                                  token_types=batch.get('token_types'))


def targets_and_mask(task: str, batch: dict):
  if task in SEQ2SEQ:
    tgt = batch['decoder_targets']
    mask = batch.get('loss_mask', batch.get('decoder_segment_ids'))
  elif task == 'classification':
    tgt, mask = batch['label'], batch.get('loss_mask')
  else:
    tgt = batch['targets']
    mask = batch.get('loss_mask', batch.get('segment_ids'))
  mask = jnp.ones(tgt.shape, jnp.float32) if mask is None else (mask != 0).astype(jnp.float32)
  return tgt, mask


def compute_loss(model, task: str, batch: dict, cfg: ModelConfig, loss_cfg: LossConfig, *,
                 deterministic: bool, microbatches: int = 1):
  """-> (total loss, metrics dict of float32 scalars).

  With `microbatches` = k > 1 (a pipelined model, which runs the k micro-batches of the batch
  in one call and averages its aux losses over them) the loss and metrics are the mean over
  the k micro-batches of each one's own loss (token counts summed), which is what gradient
  accumulation over the same k micro-batches averages.
  """
  objective = functools.partial(task_loss, task=task, batch=batch, cfg=cfg, loss_cfg=loss_cfg,
                                deterministic=deterministic, microbatches=microbatches)
  if loss_cfg.entropy_metrics or loss_cfg.activation_entropy:
    objective = _with_entropy(objective, loss_cfg)
  if loss_cfg.adversarial.attack != 'none':
    ids = batch['inputs'] if task == 'rtd' else model_inputs(task, batch)[0][0]
    return adversarial.adversarial_loss(model, objective, ids, loss_cfg.adversarial)
  return objective(model)


def _with_entropy(objective, loss_cfg: LossConfig):
  what = (('attention_weights',) if loss_cfg.entropy_metrics else ()) + (
      ('hidden',) if loss_cfg.activation_entropy else ())

  def run(model):
    (loss, metrics), sown = maps_lib.run_sowing(model, objective, what)
    if 'attention_weights' in sown:
      metrics = dict(metrics, **entropy_lib.entropy_metrics(
          maps_lib.as_maps(sown['attention_weights'])))
    if 'hidden' in sown:
      metrics = dict(metrics, **entropy_lib.activation_metrics(sown['hidden']))
    return loss, metrics
  return run


def task_loss(model, *, task: str, batch: dict, cfg: ModelConfig, loss_cfg: LossConfig,
              deterministic: bool, microbatches: int = 1):
  """The task's own loss (`compute_loss` without the analysis options)."""
  args, kwargs = model_inputs(task, batch)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  if task == 'rtd':
    if microbatches > 1:
      raise ValueError('data.task=rtd cannot run pipelined micro-batches (the electra family '
                       'refuses pipeline parallelism at config time)')
    return rtd_loss(model, batch, cfg, loss_cfg, deterministic=deterministic, **kwargs)
  out = model(*args, deterministic=deterministic, **kwargs)
  logits = out.logits
  if task == 'classification' and logits.ndim == 3:
    raise ValueError('classification needs model.num_labels > 0')
  targets, mask = targets_and_mask(task, batch)
  ce = functools.partial(cross_entropy, label_smoothing=loss_cfg.label_smoothing,
                         z_loss=loss_cfg.z_loss)
  if microbatches > 1:
    split = lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:])  # noqa: E731
    losses, per_micro = jax.vmap(lambda lg, t, m: ce(lg, t, mask=m))(
        split(logits), split(targets), split(mask))
    loss = jnp.mean(losses)
    metrics = {k: jnp.sum(v) if k == 'num_tokens' else jnp.mean(v) for k, v in per_micro.items()}
  else:
    loss, metrics = ce(logits, targets, mask=mask)
  return _with_aux(loss, dict(metrics), out.aux, cfg)


def _with_aux(loss, metrics: dict, aux: dict, cfg: ModelConfig):
  """Adds the weighted MoE auxiliary losses -> (total loss, float32 metrics)."""
  total = loss
  for name, weight in (('load_balance_loss', cfg.moe.load_balance_weight),
                       ('router_z_loss', cfg.moe.z_loss_weight)):
    if name in aux:
      total = total + weight * aux[name]
      metrics[name] = aux[name].astype(jnp.float32)
  metrics['total_loss'] = total
  return total, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def rtd_loss(model, batch: dict, cfg: ModelConfig, loss_cfg: LossConfig, *, deterministic: bool,
             segment_ids=None, token_types=None):
  """ELECTRA's objective on an mlm batch -> (total loss, metrics); see the module docstring."""
  out = model.replaced_token_detection(batch['inputs'], batch['targets'], batch['loss_mask'],
                                       segment_ids=segment_ids, token_types=token_types,
                                       deterministic=deterministic)
  targets, masked = targets_and_mask('mlm', batch)
  mlm, metrics = cross_entropy(out.generator_logits, targets, mask=masked,
                               label_smoothing=loss_cfg.label_smoothing, z_loss=loss_cfg.z_loss)
  tokens = (jnp.ones(targets.shape, jnp.float32) if segment_ids is None
            else (segment_ids != 0).astype(jnp.float32))
  rtd, rtd_metrics = replaced_token_detection_loss(out.discriminator_logits, out.replaced,
                                                   mask=tokens)
  loss = mlm + cfg.electra.disc_weight * rtd
  metrics = dict(metrics, loss=loss, mlm_loss=mlm, rtd_loss=rtd,
                 rtd_accuracy=rtd_metrics['accuracy'], rtd_tokens=rtd_metrics['num_tokens'],
                 replaced=weighted_mean(out.replaced.astype(jnp.float32), tokens))
  return _with_aux(loss, metrics, out.aux, cfg)
