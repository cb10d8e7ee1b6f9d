"""Optimizers and update transforms (CATALOG F1, F3) built with optax from a validated config.

  adamw      Loshchilov & Hutter 2019: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
  adam       Kingma & Ba 2015 (no weight decay; use adamw for it)
  lion       Chen et al. 2023: p -= lr * (sign(b1 m + (1 - b1) g) + wd * p), m = b2 m + (1 - b2) g
  adafactor  Shazeer & Stern 2018 (factored second moments, relative step size); decoupled decay
  sgd        heavy-ball or Nesterov momentum; weight decay is coupled L2 (g += wd * p)

The transform, outermost first:

  skip_nonfinite   optax.apply_if_finite: a gradient with a NaN/Inf is dropped (zero update, state
                   unchanged) and counted in `total_notfinite` (micro-batches under accumulation)
  grad_accum_steps optax.MultiSteps: k micro-batch gradients are averaged, the inner optimizer steps
                   once every k calls (zeros in between). With a mean-reduced loss over equal-size
                   micro-batches this equals one step on the k-times larger batch.
  ema_decay        ema = d * ema + (1 - d) * p after each real update (Polyak averaging),
                   kept in the optimizer state; read it with `ema_params(opt_state)`
  grad_clip_norm   g *= min(1, c / ||g||_2), the global norm over all parameters
  optimizer        the update above, with lr from `jaxformer.train.schedules.make_schedule`
  layerwise_lr_decay  updates *= decay^(L - i) for layer i (ELECTRA, Clark et al. 2020; BEiT)

Parameters are recognised by their pytree path (nnx.State keys, dict keys, list indices):
  * layers: a path component 'layers' / 'blocks' / 'layer' / 'block' followed by an integer
    ('layers/3/...') or written 'layers_3' is layer 3; the same name followed by anything else
    is a stack of layers under scan whose leading axis is the layer axis. A stack may hold groups
    of g indexed blocks ('layers/blocks/1/...', jaxformer.models.stack with MoE every g layers):
    slice s, block j is layer s * g + j. L is the largest layer count found.
  * embeddings: any path component containing 'embed' (token, type and T5 bias tables, the tied
    output matrix), or a leaf named 'pos', 'cls', 'patch_*' (ViT) or '*table' (position tables).
  * weight decay applies to matrices only: not to parameters with one axis (norm scales, biases;
    stacked layers count their axes without the layer axis), not to biases by name ('bias', 'b',
    'b' + one letter as bq/bo/bi, '*_b', '*_bias': attention biases are [N, H]), not to leaves
    named 'scale' or under a component containing 'norm', and not to embeddings when
    `decay_embeddings=False`.
  * layer-wise LR decay: layer i gets decay^(L - i) (a per-slice vector along axis 0 for stacked
    layers), embeddings decay^(L + 1), everything else (final norm, heads) 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformer.config import DTYPES, ConfigError, _build, _to_plain, check_choice, fail
from jaxformer.train import schedules

OPTIMIZERS = ('adamw', 'adam', 'lion', 'adafactor', 'sgd')
DECAYING = ('warmup_linear', 'warmup_cosine', 'wsd')
LOSS_SCALES = ('none', 'dynamic')
LAYER_KEYS = ('layers', 'blocks', 'layer', 'block')
_INDEXED_LAYER = re.compile(r'^(?:layers|blocks|layer|block)_(\d+)$')
_BIAS = re.compile(r'^(?:bias|b|b[a-z]|\w+_b|\w+_bias)$')
_EMBEDDING_LEAF = re.compile(r'^(?:pos|cls|patch_\w+|\w*table)$')
_NEVER_GIVE_UP = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
  """optax.adafactor settings; defaults are the paper's (T5 fine-tuning uses lr=1e-3)."""
  decay_rate: float = 0.8
  factored: bool = True
  min_dim_size_to_factor: int = 128
  clipping_threshold: float | None = 1.0
  multiply_by_parameter_scale: bool = True


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The `config.optim` section. `b2=None` / `eps=None` take the optimizer's own default:
  b2 0.999 (adam, adamw), 0.99 (lion); eps 1e-8 (adam, adamw), 1e-30 (adafactor).
  `momentum` and `nesterov` are for sgd (momentum 0 is plain SGD).
  `loss_scale='dynamic'` enables fp16 dynamic loss scaling (see jaxformer.train.precision).
  """
  optimizer: str = 'adamw'
  lr: float = 1e-3
  b1: float = 0.9
  b2: float | None = None
  eps: float | None = None
  weight_decay: float = 0.0
  decay_embeddings: bool = True
  momentum: float = 0.9
  nesterov: bool = False
  mu_dtype: str | None = None
  adafactor: AdafactorConfig = AdafactorConfig()
  # schedule
  schedule: str = 'constant'
  warmup_steps: int = 0
  total_steps: int | None = None
  end_lr_ratio: float = 0.0
  wsd_decay_fraction: float = 0.2
  wsd_decay_shape: str = 'linear'
  # update transforms
  grad_clip_norm: float | None = None
  grad_accum_steps: int = 1
  layerwise_lr_decay: float | None = None
  ema_decay: float | None = None
  skip_nonfinite: bool = False
  # fp16 loss scaling
  loss_scale: str = 'none'
  loss_scale_init: float = 2.0 ** 15
  loss_scale_growth_interval: int = 2000

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides) -> 'OptimConfig':
    """Builds a validated config from a mapping such as `config.optim` (a ConfigDict)."""
    cfg = _build(cls, dict(_to_plain(d or {}), **overrides), 'optim')
    cfg.validate()
    return cfg

  def replace(self, **changes) -> 'OptimConfig':
    cfg = dataclasses.replace(self, **changes)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    check_choice('optim.optimizer', self.optimizer, OPTIMIZERS)
    check_choice('optim.schedule', self.schedule, schedules.SCHEDULES)
    check_choice('optim.wsd_decay_shape', self.wsd_decay_shape, schedules.WSD_DECAY_SHAPES)
    check_choice('optim.loss_scale', self.loss_scale, LOSS_SCALES)
    if self.mu_dtype is not None:
      check_choice('optim.mu_dtype', self.mu_dtype, DTYPES)
    if not math.isfinite(self.lr) or self.lr < 0:
      fail('optim.lr', self.lr, 'must be a finite number >= 0')
    for name in ('b1', 'b2', 'momentum'):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value < 1.0:
        fail(f'optim.{name}', value, 'must be in [0, 1)')
    if self.eps is not None and self.eps < 0:
      fail('optim.eps', self.eps, 'must be >= 0')
    if self.weight_decay < 0:
      fail('optim.weight_decay', self.weight_decay, 'must be >= 0')
    if self.weight_decay and self.optimizer == 'adam':
      fail('optim.weight_decay', self.weight_decay,
           "must be 0 for optimizer='adam'; use optimizer='adamw' for decoupled weight decay")
    if self.nesterov and self.optimizer == 'sgd' and not self.momentum:
      fail('optim.nesterov', self.nesterov, 'needs optim.momentum > 0')
    if self.adafactor.decay_rate <= 0 or self.adafactor.decay_rate > 1:
      fail('optim.adafactor.decay_rate', self.adafactor.decay_rate, 'must be in (0, 1]')
    if self.warmup_steps < 0:
      fail('optim.warmup_steps', self.warmup_steps, 'must be >= 0')
    if self.schedule == 'inverse_sqrt' and self.warmup_steps <= 0:
      fail('optim.warmup_steps', self.warmup_steps, "must be > 0 for schedule='inverse_sqrt'")
    # total_steps None: the trainer makes the schedule as long as the run (train.steps).
    if self.schedule in DECAYING and self.total_steps is not None:
      if self.total_steps <= self.warmup_steps:
        fail('optim.total_steps', self.total_steps,
             f'must be an integer > optim.warmup_steps={self.warmup_steps} for '
             f'schedule={self.schedule!r} (or None: as long as train.steps)')
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      fail('optim.end_lr_ratio', self.end_lr_ratio, 'must be in [0, 1]')
    if self.schedule == 'wsd' and self.total_steps is not None:
      if not 0.0 < self.wsd_decay_fraction <= 1.0:
        fail('optim.wsd_decay_fraction', self.wsd_decay_fraction, 'must be in (0, 1]')
      decay_start = self.total_steps - max(round(self.wsd_decay_fraction * self.total_steps), 1)
      if decay_start < self.warmup_steps:
        fail('optim.wsd_decay_fraction', self.wsd_decay_fraction,
             f'leaves the decay starting at step {decay_start}, before the end of warmup '
             f'(optim.warmup_steps={self.warmup_steps})')
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      fail('optim.grad_clip_norm', self.grad_clip_norm, 'must be > 0 or None (no clipping)')
    if self.grad_accum_steps < 1:
      fail('optim.grad_accum_steps', self.grad_accum_steps, 'must be a positive integer')
    if self.layerwise_lr_decay is not None and not 0.0 < self.layerwise_lr_decay <= 1.0:
      fail('optim.layerwise_lr_decay', self.layerwise_lr_decay, 'must be in (0, 1] or None')
    if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
      fail('optim.ema_decay', self.ema_decay, 'must be in [0, 1) or None')
    if self.loss_scale_init <= 0:
      fail('optim.loss_scale_init', self.loss_scale_init, 'must be > 0')
    if self.loss_scale_growth_interval < 1:
      fail('optim.loss_scale_growth_interval', self.loss_scale_growth_interval,
           'must be a positive integer')


# -------------------------------------------------------------------- parameter roles by path
def path_names(path) -> tuple[str, ...]:
  """A pytree key path as strings; the 'value' attribute of an nnx.Variable is dropped, so the
  names of an nnx.State with Variables and of its pure-array form are the same."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != 'value':
        names.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  return tuple(names)


class LayerPosition(NamedTuple):
  """Where a parameter sits in the depth of the model.

  index: the layer of an unstacked parameter ('layers/3/...', 'layers_3/...').
  stack: for a stacked parameter (leading axis = layers or groups of layers under scan), the
    path up to the stacked container; None otherwise.
  inner: inside a stacked group of blocks ('layers/blocks/1/...'), the block's place in the group.
  """
  index: int | None = None
  stack: tuple[str, ...] | None = None
  inner: int | None = None


def _indexed(names: tuple[str, ...], j: int) -> int | None:
  """The layer index named at names[j] ('layers_3', or 'layers' then '3'), else None."""
  m = _INDEXED_LAYER.match(names[j])
  if m:
    return int(m.group(1))
  if names[j] in LAYER_KEYS and j + 1 < len(names) and names[j + 1].isdigit():
    return int(names[j + 1])
  return None


def layer_position(names: tuple[str, ...]) -> LayerPosition:
  """The layer role of the parameter at `names` (see LayerPosition and the module docstring)."""
  for j, name in enumerate(names):
    index = _indexed(names, j)
    if index is not None:
      return LayerPosition(index=index)
    if name in LAYER_KEYS:
      inner = next((i for i in (_indexed(names, k) for k in range(j + 1, len(names)))
                    if i is not None), None)
      return LayerPosition(stack=names[:j + 1], inner=inner)
  return LayerPosition()


def is_embedding(names: tuple[str, ...]) -> bool:
  if names and _EMBEDDING_LEAF.match(names[-1]):
    return True
  return any('embed' in n.lower() for n in names)


def is_decayed(names: tuple[str, ...], ndim: int, decay_embeddings: bool = True) -> bool:
  """Whether decoupled weight decay applies to the parameter at `names` (rule in the docstring)."""
  stacked = layer_position(names).stack is not None
  if ndim - int(stacked) <= 1:
    return False
  if names and (_BIAS.match(names[-1]) or names[-1] == 'scale'):
    return False
  if any('norm' in n.lower() for n in names):
    return False
  return decay_embeddings or not is_embedding(names)


def decay_mask(params, decay_embeddings: bool = True):
  """A tree of bools (same structure as `params`): True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: is_decayed(path_names(p), np.ndim(x), decay_embeddings), params)


def _depth(params):
  """(L, group sizes per stack): L is the largest layer count over the stacks and indexed layers."""
  group, slices, count = {}, {}, 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    pos = layer_position(path_names(path))
    if pos.stack is not None and np.ndim(x):
      group[pos.stack] = max(group.get(pos.stack, 1), (pos.inner or 0) + 1)
      slices[pos.stack] = max(slices.get(pos.stack, 0), np.shape(x)[0])
    elif pos.index is not None:
      count = max(count, pos.index + 1)
  for stack, n in slices.items():
    count = max(count, n * group[stack])
  return count, group


def num_layers(params) -> int:
  """The layer count L seen in the parameter paths (0 when there are no layers)."""
  return _depth(params)[0]


def layerwise_lr_scales(params, decay: float):
  """Per-parameter LR factors: decay^(L - i) for layer i, decay^(L + 1) for embeddings, else 1.

  A stacked parameter gets a float32 array of shape (n, 1, ..., 1), one factor per slice; slice s
  of a stack of groups of g blocks holds layer s * g + (the block's place in the group).
  """
  total, group = _depth(params)

  def scale(path, x):
    names = path_names(path)
    pos = layer_position(names)
    if pos.stack is not None and np.ndim(x):
      n = np.shape(x)[0]
      layer = np.arange(n, dtype=np.float64) * group[pos.stack] + (pos.inner or 0)
      factors = np.asarray(decay ** (total - layer), np.float32)
      return factors.reshape((n,) + (1,) * (np.ndim(x) - 1))
    if pos.index is not None:
      return decay ** (total - pos.index)
    if is_embedding(names):
      return decay ** (total + 1)
    return 1.0

  return jax.tree_util.tree_map_with_path(scale, params)


# -------------------------------------------------------------------- transforms
def scale_by_layerwise_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer-wise LR factor (see `layerwise_lr_scales`)."""

  def update(updates, state, params=None):
    del params
    scales = layerwise_lr_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class EmaState(NamedTuple):
  """`ema` is the exponential moving average of the parameters, in the parameters' dtype."""
  count: jax.Array
  ema: Any
  inner_state: Any


def with_ema(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """Keeps ema = decay * ema + (1 - decay) * (params + updates), starting from the initial params.

  The average is formed in float32 and stored in each parameter's dtype. Wrapped by MultiSteps
  and apply_if_finite, it moves only on updates that are applied.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return EmaState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.array, params),
                    inner_state=inner.init(params))

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('with_ema needs the current params: call tx.update(grads, state, params)')
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)

    def average(e, p, u):
      new = p.astype(jnp.float32) + u.astype(jnp.float32)
      return (decay * e.astype(jnp.float32) + (1.0 - decay) * new).astype(e.dtype)

    ema = jax.tree.map(average, state.ema, params, updates)
    return updates, EmaState(optax.safe_increment(state.count), ema, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _find(opt_state, cls):
  """The first `cls` node in an optax state (Variables, as in nnx.Optimizer, are unwrapped)."""
  nodes = jax.tree.leaves(nnx.as_pure(opt_state), is_leaf=lambda x: isinstance(x, cls))
  return next((x for x in nodes if isinstance(x, cls)), None)


def ema_params(opt_state):
  """The EMA of the parameters held in `opt_state` (optax state or nnx.Optimizer.opt_state)."""
  found = _find(opt_state, EmaState)
  if found is None:
    raise ValueError('the optimizer state holds no EMA; set optim.ema_decay')
  return found.ema


def num_skipped(opt_state) -> jax.Array:
  """How many gradients (micro-batches under accumulation) skip_nonfinite dropped so far."""
  found = _find(opt_state, optax.ApplyIfFiniteState)
  if found is None:
    raise ValueError('the optimizer state counts no skipped steps; set optim.skip_nonfinite')
  return found.total_notfinite


def _base_optimizer(cfg: OptimConfig, lr) -> optax.GradientTransformation:
  mask = lambda params: decay_mask(params, cfg.decay_embeddings)  # noqa: E731
  mu_dtype = DTYPES[cfg.mu_dtype] if cfg.mu_dtype else None
  if cfg.optimizer in ('adamw', 'adam'):
    kwargs = dict(b1=cfg.b1, b2=0.999 if cfg.b2 is None else cfg.b2,
                  eps=1e-8 if cfg.eps is None else cfg.eps, mu_dtype=mu_dtype)
    if cfg.optimizer == 'adam':
      return optax.adam(lr, **kwargs)
    return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=mask, **kwargs)
  if cfg.optimizer == 'lion':
    return optax.lion(lr, b1=cfg.b1, b2=0.99 if cfg.b2 is None else cfg.b2, mu_dtype=mu_dtype,
                      weight_decay=cfg.weight_decay, mask=mask)
  if cfg.optimizer == 'adafactor':
    a = cfg.adafactor
    return optax.adafactor(
        lr, min_dim_size_to_factor=a.min_dim_size_to_factor, decay_rate=a.decay_rate,
        multiply_by_parameter_scale=a.multiply_by_parameter_scale,
        clipping_threshold=a.clipping_threshold, factored=a.factored,
        eps=1e-30 if cfg.eps is None else cfg.eps,
        weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
  sgd = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
  if cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), sgd)
  return sgd


def make_optimizer(cfg: OptimConfig, params=None) -> optax.GradientTransformation:
  """The full update transform described in the module docstring.

  Args:
    cfg: a validated OptimConfig.
    params: optional parameter tree (pure arrays or an nnx.State) used to check the config against
      the model before training starts: layer-wise LR decay needs layer-indexed parameters.
  Returns:
    An optax transform; its `update` needs `params` when EMA or weight decay is on. Works with
    `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
  """
  if cfg.layerwise_lr_decay is not None and params is not None and not num_layers(params):
    raise ConfigError(
        f'optim.layerwise_lr_decay={cfg.layerwise_lr_decay!r} is invalid: no parameter path '
        f'names a layer (a component in {LAYER_KEYS} or like layers_3)')
  parts = []
  if cfg.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(_base_optimizer(cfg, schedules.make_schedule(cfg)))
  if cfg.layerwise_lr_decay is not None:
    parts.append(scale_by_layerwise_decay(cfg.layerwise_lr_decay))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if cfg.ema_decay is not None:
    tx = with_ema(tx, cfg.ema_decay)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
  if cfg.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
  return tx
