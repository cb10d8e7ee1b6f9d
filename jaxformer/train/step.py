"""Functional train and eval steps (nnx.split / nnx.merge under jax.jit, donated state).

State is a plain pytree {'params': trainable parameters, 'opt_state': optax state, 'step': int32
[, 'frozen': parameters that do not train]}; the model structure (graphdef) and non-parameter
variables (RNG streams) stay outside it. A `ParamPlan` (jaxformer/train/param_plan.py) makes the
model's parameters from 'params' and 'frozen' (LoRA, a quantized base) and masks gradients and
updates of the groups gradual unfreezing keeps frozen; without one 'params' are the model's. With
`compress.prune` the state holds 'prune_masks' (jaxformer/compress/prune.py: masks recomputed at
the schedule's steps before the forward pass, gradients and updates masked so pruned weights stay
0); with `compress.distill` it holds the teacher's parameters 'teacher' (not trained, not
checkpointed) and the loss is the distillation loss (jaxformer/compress/distill.py). Dropout keys are
`fold_in(seed key, step)`, so a resumed run draws exactly the masks of an uninterrupted one.

A step splits the batch into `optim.grad_accum_steps` micro-batches and feeds them through the
optax transform one by one (optax.MultiSteps applies the averaged update on the last), so one
step on k micro-batches equals one step on the k-times larger batch. fp16 runs scale the loss
with flax's DynamicScale; non-finite gradients are dropped by optax.apply_if_finite and counted,
and the trainer stops (or goes on, by `train.nonfinite`) when the count grows.

Under pipeline parallelism (`pipeline`, a `PipelineSpec`) the k micro-batches are the pipeline's:
one forward and backward pass runs them all through the stages, the loss is the mean of their
losses, and its gradient (the mean of theirs) goes through the optax transform k times, so the
optimizer state and its MultiSteps counters are those of the unpipelined run (checkpoints move
between the two layouts) and the update is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.compress import prune as prune_lib
from jaxformer.config import ModelConfig
from jaxformer.train import tasks
from jaxformer.train.precision import cast_floating

METRIC_SUMS = ('num_tokens', 'rtd_tokens')
LORA_DROPOUT_STREAM = 0x10DA  # folded into the step's dropout key for LoRA dropout's masks


def split_micro(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B / k, ...] for every array in the batch."""
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def with_dropout_key(rest, key):
  """`rest` (non-parameter state) with every dropout stream re-keyed from `key`.

  Each stream gets its own key (folded with its index); a stream of stacked layers (a key
  array) gets one key per layer. Counts restart at 0, so masks depend only on (seed, step).
  """
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  leaves, treedef = jax.tree.flatten(rest, is_leaf=is_var)
  out = []
  for i, v in enumerate(leaves):
    if isinstance(v, nnx.RngKey) and v.tag == 'dropout':
      k = jax.random.fold_in(key, i)
      shape = v[...].shape
      v = v.replace(jax.random.split(k, shape) if shape else k)
    elif isinstance(v, nnx.RngCount) and v.tag == 'dropout':
      v = v.replace(jnp.zeros_like(v[...]))
    out.append(v)
  return jax.tree.unflatten(treedef, out)


def make_train_step(graphdef, rest, *, task: str, model_cfg: ModelConfig,
                    loss_cfg: tasks.LossConfig, tx: optax.GradientTransformation,
                    accum_steps: int, seed: int, loss_scale=None, grad_shardings=None,
                    pipelined: bool = False, plan=None, pruner=None, teacher=None):
  """Returns train_step(state, batch) -> (state, metrics).

  `grad_shardings` (the parameters' shardings) pins each gradient to its parameter's layout
  as soon as it is computed, so data-parallel gradient sums become reduce-scatters onto the
  FSDP shards rather than all-reduces of whole gradients. `pipelined`: the model runs the
  `accum_steps` micro-batches as a pipeline (see the module docstring).
  """
  base_key = jax.random.key(seed)
  param_dtype = model_cfg.params_dtype
  microbatches = accum_steps if pipelined else 1

  def loss_fn(params, frozen, batch, key, extra):
    full = params if plan is None else plan.model_params(params, frozen)
    model = nnx.merge(graphdef, full, with_dropout_key(rest, key))
    if plan is not None:  # LoRA dropout: its own key, apart from the model's dropout streams
      plan.attach_dropout(model, params, jax.random.fold_in(key, LORA_DROPOUT_STREAM))
    if teacher is not None:
      return teacher.loss(model, extra['teacher'], task, batch, model_cfg, deterministic=False)
    return tasks.compute_loss(model, task, batch, model_cfg, loss_cfg, deterministic=False,
                              microbatches=microbatches)

  def micro_step(carry, micro):
    # The frozen parameters ride in the carry: Variables closed over from outside the scan
    # would belong to another trace level than the model merged inside it.
    params, opt_state, scale, step, i, frozen, extra = carry
    key = jax.random.fold_in(jax.random.fold_in(base_key, step), i)
    if scale is not None:
      grad_fn = scale.value_and_grad(loss_fn, has_aux=True)
      scale, _, (loss, metrics), grads = grad_fn(params, frozen, micro, key, extra)
    else:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, micro,
                                                                         key, extra)
    grads = cast_floating(grads, param_dtype)
    mask = None if plan is None else plan.update_mask(step)
    if mask is not None:
      grads = plan.masked(grads, mask)
    if pruner is not None:  # pruned weights get no gradient, so no momentum either
      grads = prune_lib.apply_masks(grads, extra['prune_masks'])
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))

    def update(_, carry):
      params, opt_state = carry
      updates, opt_state = tx.update(grads, opt_state, params)
      if mask is not None:  # weight decay would still move a frozen group
        updates = plan.masked(updates, mask)
      if pruner is not None:
        updates = prune_lib.apply_masks(updates, extra['prune_masks'])
      return optax.apply_updates(params, updates), opt_state

    # Pipelined: the mean gradient once for each micro-batch (a loop, not M copies to compile).
    params, opt_state = jax.lax.fori_loop(0, microbatches, update, (params, opt_state))
    return (params, opt_state, scale, step, i + 1, frozen, extra), metrics

  def train_step(state, batch):
    micro = split_micro(batch, accum_steps // microbatches)
    params, frozen = state['params'], state.get('frozen')
    extra = {k: state[k] for k in ('prune_masks', 'teacher') if k in state}
    if pruner is not None:
      key = jax.random.fold_in(base_key, state['step'])
      params, extra['prune_masks'] = pruner.maybe_prune(
          params, extra['prune_masks'], state['step'],
          lambda p: _batch_grad(loss_fn, p, frozen, micro, key, extra))
    carry = (params, state['opt_state'], state.get('loss_scale'), state['step'],
             jnp.zeros((), jnp.int32), frozen, extra)
    (params, opt_state, scale, _, _, _, extra), metrics = jax.lax.scan(micro_step, carry, micro)
    metrics = {k: (jnp.sum(v) if k in METRIC_SUMS else jnp.mean(v)) for k, v in metrics.items()}
    new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1, **extra)
    if scale is not None:
      new_state['loss_scale'] = scale
      metrics['loss_scale'] = scale.scale
    return new_state, metrics

  return train_step


def _batch_grad(loss_fn, params, frozen, micro, key, extra):
  """The loss gradient summed over the step's micro-batches (SNIP's saliency)."""
  def one(total, mb):
    g = jax.grad(lambda p: loss_fn(p, frozen, mb, key, extra)[0])(params)
    return jax.tree.map(jnp.add, total, g), None

  return jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), micro)[0]


def make_eval_step(graphdef, rest, *, task: str, model_cfg: ModelConfig,
                   loss_cfg: tasks.LossConfig, regular_ids: tuple[int, int] | None = None,
                   plan=None):
  """Returns eval_step(view, batch) -> sums {nll_sum, correct_sum, num_tokens[, num_bytes]}
  (and rtd_loss_sum, rtd_correct_sum, rtd_tokens for the discriminator of task 'rtd').

  `regular_ids` = (lo, hi) marks byte tokens for bits per byte: the loss of every target counts,
  but only byte targets count as bytes (special tokens such as EOS cost bits but are not bytes).
  """

  def eval_step(view, batch):
    # view: the parameters, or {'params', 'frozen'} with a plan (TrainProgram.model_view).
    params = view if plan is None else plan.view_params(view)
    # Deterministic: dropout is off, the fresh stream keys only keep the graph well formed.
    model = nnx.merge(graphdef, params, with_dropout_key(rest, jax.random.key(0)))
    _, metrics = tasks.compute_loss(model, task, batch, model_cfg, loss_cfg,
                                    deterministic=True)
    n = metrics['num_tokens']
    sums = {'nll_sum': metrics['nll'] * n, 'correct_sum': metrics['accuracy'] * n,
            'num_tokens': n}
    if 'rtd_tokens' in metrics:
      r = metrics['rtd_tokens']
      sums.update(rtd_loss_sum=metrics['rtd_loss'] * r,
                  rtd_correct_sum=metrics['rtd_accuracy'] * r, rtd_tokens=r)
    if regular_ids is not None and task in ('lm',):
      targets, mask = tasks.targets_and_mask(task, batch)
      is_byte = (targets >= regular_ids[0]) & (targets < regular_ids[1])
      sums['num_bytes'] = jnp.sum(mask * is_byte)
    return sums

  return eval_step
