"""An experiment on a device layout: its state, shardings and compiled steps.

`TrainProgram(exp, layout)` is what the trainer, the evaluation and generation commands, the
plan command (`python -m jaxformer.parallel.plan`) and the layout tests share. It knows, before
anything is compiled or allocated:

  abstract_state    the train state {'params', 'opt_state', 'step'[, 'loss_scale'][, 'frozen']
                    [, 'prune_masks'][, 'teacher']} as shapes; 'params' are the trainable
                    parameters and 'frozen' the rest (under finetune.method lora / qlora /
                    modules; see param_plan.py); 'prune_masks' under compress.prune
                    (checkpointed). Under compress.distill the train step also takes the
                    teacher's parameters as 'teacher' (`with_teacher`: read from the teacher's
                    run at every start, never checkpointed, not in the optimizer)
  state_shardings   where every leaf lives (parameters by their logical names; optimizer moments
                    like their parameters; counters replicated); building them refuses a mesh
                    axis that does not divide the dimension it shards
  batch_sharding    input batches split over the batch axes

and it makes the state in place (`init_state`: sharded initialisation, nothing whole on one
device) and the jitted steps with pinned input and output shardings (`train_step`,
`eval_step`), traced with the layout active so the models' activation constraints apply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.finetune import lora
from jaxformer.parallel import rules as R
from jaxformer.parallel import state as state_lib
from jaxformer.parallel.pipeline import PipelineSpec
from jaxformer.parallel.sharding import Layout
from jaxformer.train import optimizer as optim_lib
from jaxformer.train import tasks
from jaxformer.train.experiment import Experiment
from jaxformer.train.param_plan import ParamPlan
from jaxformer.train.precision import make_loss_scale
from jaxformer.train.step import make_eval_step, make_train_step

# State entries that checkpoints do not hold: rebuilt at every start.
NOT_SAVED = ('frozen', 'teacher')


class TrainProgram:
  """See the module docstring. `regular_ids` = (lo, hi) marks byte tokens for bits per byte;
  `fresh`: parameter paths the finetune.init_from source lacks (they train)."""

  def __init__(self, exp: Experiment, layout: Layout, *,
               regular_ids: tuple[int, int] | None = None, fresh=()):
    stages = layout.sizes.get('stage', 1)
    if stages > 1 and layout.pipeline is None:
      exp.check_pipeline(stages)
      layout = dataclasses.replace(layout, pipeline=PipelineSpec(
          stages, exp.optim.grad_accum_steps, exp.parallel.pipeline.repeats))
    self.exp, self.layout, self.regular_ids = exp, layout, regular_ids
    seed = exp.train.seed
    m = exp.model
    layout.check_activations({
        R.HEADS: m.num_heads, R.KV_HEADS: m.num_kv_heads, R.HEAD_DIM: m.head_dim,
        R.MLP: m.ffn_hidden_dim, R.VOCAB: m.vocab_size, R.EMBED: m.d_model,
        R.EXPERT: max(m.moe.num_experts, 1)})
    abstract = state_lib.abstract_model(exp.model, seed)
    self.graphdef, model_params, self.abstract_rest = nnx.split(abstract, nnx.Param, ...)
    self.abstract_model_params = model_params
    self.model_param_shardings = layout.state_shardings(model_params)
    self.plan = ParamPlan(exp.finetune, model_params, fresh=fresh, qat=exp.compress.qat)
    if self.plan.dropout:
      _check_lora_dropout(exp, abstract, self.plan, layout)
    abstract_params, abstract_frozen = jax.eval_shape(self.plan.split, model_params)
    self.param_shardings, self.frozen_shardings = self.plan.shardings(
        abstract_params, abstract_frozen, layout)
    self.rest_shardings = layout.state_shardings(self.abstract_rest)
    self.tx = optim_lib.make_optimizer(exp.optim.replace(skip_nonfinite=True), abstract_params)
    self.opt_shardings = state_lib.optimizer_shardings(self.tx, abstract_params,
                                                       self.param_shardings, layout)
    self.abstract_state: dict[str, Any] = {
        'params': abstract_params,
        'opt_state': jax.eval_shape(self.tx.init, abstract_params),
        'step': jax.ShapeDtypeStruct((), jnp.int32),
    }
    self.state_shardings: dict[str, Any] = {
        'params': self.param_shardings, 'opt_state': self.opt_shardings,
        'step': layout.replicated}
    if abstract_frozen is not None:
      self.abstract_state['frozen'] = abstract_frozen
      self.state_shardings['frozen'] = self.frozen_shardings
    self.pruner = self.teacher = None
    if exp.compress.prune.enabled:
      from jaxformer.compress.prune import Pruner  # pylint: disable=import-outside-toplevel
      self.pruner = Pruner(exp.compress.prune, abstract_params)
      self.abstract_state['prune_masks'] = jax.eval_shape(self.pruner.init_masks)
      self.state_shardings['prune_masks'] = self.pruner.shardings(layout)
    if exp.compress.distill.enabled:
      from jaxformer.compress.distill import Teacher  # pylint: disable=import-outside-toplevel
      self.teacher = Teacher(exp, layout)  # reads the teacher's run only when training
    if make_loss_scale(exp.optim) is not None:
      self.abstract_state['loss_scale'] = jax.eval_shape(lambda: make_loss_scale(exp.optim))
      self.state_shardings['loss_scale'] = layout.replicated
    self.batch_sharding = layout.batch_sharding()
    self.num_params = sum(x.size for x in jax.tree.leaves(model_params))
    self.num_trainable = sum(x.size for x in jax.tree.leaves(abstract_params))

  # ---------------------------------------------------------------- state
  def target(self) -> Any:
    """The abstract train state with its shardings, without the frozen parameters and the
    teacher (never checkpointed): what a checkpoint is restored into."""
    return state_lib.abstract_with(
        {k: v for k, v in self.abstract_state.items() if k not in NOT_SAVED},
        {k: v for k, v in self.state_shardings.items() if k not in NOT_SAVED})

  def _model_params(self, initial):
    """The model's full parameters: `initial` (loaded from finetune.init_from), or made by
    the model's initialisers."""
    if initial is not None:
      return initial
    return nnx.state(state_lib._build(self.exp.model, self.exp.train.seed), nnx.Param)  # pylint: disable=protected-access

  def _split_key(self):
    return jax.random.fold_in(jax.random.key(self.exp.train.seed), 0x10AA)

  def init_state(self, initial=None) -> dict[str, Any]:
    """A fresh train state, every leaf created on its devices (see parallel/state.py).
    `initial`: the model's parameters to start from (finetune.init_from), laid out by
    `model_param_shardings`."""
    exp = self.exp

    def init(initial):
      params, frozen = self.plan.split(self._model_params(initial), self._split_key())
      state = {'params': params, 'opt_state': self.tx.init(params),
               'step': jnp.zeros((), jnp.int32)}
      if frozen is not None:
        state['frozen'] = frozen
      if self.pruner is not None:
        state['prune_masks'] = self.pruner.init_masks()
      scale = make_loss_scale(exp.optim)
      if scale is not None:
        state['loss_scale'] = scale
      return state

    state = jax.jit(init, out_shardings=self.state_shardings)(initial)
    return self.with_teacher(state)

  def with_teacher(self, state) -> dict[str, Any]:
    """`state` with the teacher's parameters (compress.distill), read from its run."""
    if self.teacher is not None:
      state = dict(state, teacher=self.teacher.load())
    return state

  def frozen(self, initial=None) -> Any:
    """The frozen parameters (None under finetune.method='full'), made in place from `initial`
    or the model's initialisers: what a restored state lacks."""
    if self.frozen_shardings is None:
      return None
    return jax.jit(lambda p: self.plan.split(self._model_params(p), self._split_key())[1],
                   out_shardings=self.frozen_shardings)(initial)

  def model_view(self, state) -> Any:
    """What the eval step takes: the trainable parameters, with the frozen ones if any."""
    if 'frozen' not in state:
      return state['params']
    return {'params': state['params'], 'frozen': state['frozen']}

  @functools.cached_property
  def full_params(self):
    """jit(view) -> the model's full parameters (LoRA merged, QLoRA base dequantized, QAT's
    fake quantization applied): what export and sampling use. `view` is `model_view(state)`."""
    return jax.jit(self.plan.view_params, out_shardings=self.model_param_shardings)

  @functools.cached_property
  def rest(self) -> Any:
    """The model's non-parameter variables (RNG streams and the like), made in place."""
    exp, seed = self.exp, self.exp.train.seed

    def init():
      return nnx.split(state_lib._build(exp.model, seed), nnx.Param, ...)[2]  # pylint: disable=protected-access

    return jax.jit(init, out_shardings=self.rest_shardings)()

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)

  # ---------------------------------------------------------------- steps
  @functools.cached_property
  def train_step(self):
    """jit(step)(state, batch) -> (state, metrics); the state is donated."""
    exp = self.exp
    t = exp.train
    loss_cfg = tasks.LossConfig.from_train(t)
    step = make_train_step(
        self.graphdef, self.rest, task=exp.data.task, model_cfg=exp.model, loss_cfg=loss_cfg,
        tx=self.tx, accum_steps=exp.optim.grad_accum_steps, seed=t.seed,
        grad_shardings=self.param_shardings if self.layout.mesh.size > 1 else None,
        pipelined=self.layout.pipeline is not None, plan=self.plan, pruner=self.pruner,
        teacher=self.teacher)
    shardings = self.state_shardings
    if self.teacher is not None:
      shardings = dict(shardings, teacher=self.teacher.shardings)
    return jax.jit(self.layout.wrap(step),
                   in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, self.layout.replicated),
                   donate_argnums=0)

  @functools.cached_property
  def eval_step(self):
    """jit(step)(view, batch) -> metric sums (replicated); `view` is `model_view(state)`
    (the parameters under finetune.method='full')."""
    exp = self.exp
    step = make_eval_step(self.graphdef, self.rest, task=exp.data.task, model_cfg=exp.model,
                          loss_cfg=tasks.LossConfig(), regular_ids=self.regular_ids,
                          plan=self.plan)
    view = self.param_shardings
    if self.frozen_shardings is not None:
      view = {'params': self.param_shardings, 'frozen': self.frozen_shardings}
    return jax.jit(self.layout.wrap(step),
                   in_shardings=(view, self.batch_sharding),
                   out_shardings=self.layout.replicated)

  def abstract_batch(self, batch) -> dict[str, jax.ShapeDtypeStruct]:
    """A host batch (one process's rows) as the global abstract batch the steps take."""
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + tuple(v.shape[1:]), v.dtype,
                                    sharding=self.batch_sharding) for k, v in batch.items()}


def _check_lora_dropout(exp: Experiment, abstract_model, plan: ParamPlan, layout: Layout) -> None:
  """Refuses finetune.lora.dropout where the step cannot attach the low-rank paths."""
  p = exp.finetune.lora.dropout
  why = None
  if exp.model.reversible:
    why = ('model.reversible=True: the reversible layers run under a custom gradient that '
           'takes no extra per-layer inputs')
  elif layout.pipeline is not None:
    why = 'pipeline parallelism: the stages run the layers inside their own transforms'
  else:
    missing = lora.dropout_sites_missing(abstract_model, plan.targets)
    if missing:
      why = (f'the targets {missing} are not computed through a projection site '
             '(jaxformer.layers.linear.project: attention q k v o, FFN, untied head, Mamba, '
             'convolution, adapters), so their input cannot be dropped; choose other '
             'finetune.lora.targets')
  if why is not None:
    raise ConfigError(f'finetune.lora.dropout={p} is invalid with {why}; or use dropout 0')
