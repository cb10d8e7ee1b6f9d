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

Parameters are recognised by their metadata, never by their path, so that renaming modules or
reshaping the layer axis (into pipeline stages, say) changes no mask. Each nnx.Param carries
logical axis names (jaxformer.parallel.rules.PARAM_NAMES) and, where the names cannot tell, a
`role` and a layer (jaxformer.layers.base.param / tag_params):
  * layers: the dimensions up to the last one named 'layers' enumerate layer slices row-major
    (a scanned stack [G, ...], or the same stack cut into stages [S, G/S, ...]). A slice may hold
    a group of g blocks (jaxformer.models.stack with MoE every g layers): block j carries
    metadata layer=j, layers_per_slice=g, and slice s of it is layer s * g + j. A layer that is
    not stacked (Transformer-XL) carries layer=i. L is the largest layer + 1.
  * embeddings: tables, whose first dimension (after the layer dimensions) is 'vocab' or
    'position' and which have two or more dimensions (token, type and position tables, the tied
    output matrix, T5 and Shaw relative tables; not the output head [embed, vocab] or its bias);
    and parameters with role='embedding' (ViT patch projection and [CLS], the embedding norm).
  * weight decay applies to matrices: two or more dimensions besides the layer dimensions, none
    named 'norm', and role != 'bias' (biases with two axes, such as attention's [N, H] or an
    expert's [E, F], say so; vectors and scalars need not); not to embeddings when
    `decay_embeddings=False`. role='weight' marks a matrix that is not a table although its
    first dimension is 'position' (Linformer's E, F).
  * the parameter-efficient modules' roles (jaxformer/layers/peft.py) say which parameters
    PEFT fine-tuning trains: role='adapter' and 'prefix' are ordinary parameters by their names
    (the adapters' matrices and the [P, K, H] prefixes decay, the adapters' biases do not; in
    their layer for layer-wise LR decay); role='prompt' is part of the input embedding, like
    role='embedding'.
  * layer-wise LR decay: layer i gets decay^(L - i) (one factor per layer slice for stacked
    parameters), embeddings decay^(L + 1), everything else (final norm, heads) 1.
`make_optimizer(cfg, params)` reads the roles once from the parameters' Variables; the transform
then finds them again by path for the plain arrays that optax and nnx.Optimizer pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformer.config import DTYPES, ConfigError, _build, _to_plain, check_choice, fail
from jaxformer.parallel.sharding import names_of, path_str
from jaxformer.train import schedules

OPTIMIZERS = ('adamw', 'adam', 'lion', 'adafactor', 'sgd')
DECAYING = ('warmup_linear', 'warmup_cosine', 'wsd')
LOSS_SCALES = ('none', 'dynamic')
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


# -------------------------------------------------------------------- parameter roles by metadata
ROLES = ('bias', 'embedding', 'weight', 'adapter', 'prefix', 'prompt')
_TABLE_AXES = ('vocab', 'position')


class ParamRole(NamedTuple):
  """What the optimizer knows about one parameter, read from its metadata (module docstring).

  layers: the layer of each slice along the layer dimensions, shaped to broadcast against the
    parameter (shape () for an unstacked layer's parameter); None outside the layers.
  matrix: weight decay applies (with `decay_embeddings`, also to embeddings).
  embedding: an embedding table or a part of the input embedding.
  """
  layers: np.ndarray | None
  matrix: bool
  embedding: bool


def param_role(variable: nnx.Variable, what: str = 'a parameter') -> ParamRole:
  """The role of one parameter (an nnx.Variable) by its logical names and metadata."""
  names = names_of(variable)
  if names is None:
    raise ValueError(
        f'{what} has no logical axis names (out_sharding metadata): the optimizer reads weight '
        f'decay and layer-wise LR from them; create it with jaxformer.layers.base.param')
  meta = variable.get_metadata()
  role = meta.get('role')
  if role is not None and role not in ROLES:
    raise ValueError(f'{what}: metadata role={role!r} is invalid: allowed values are {list(ROLES)}')
  shape = np.shape(variable.get_value())
  # The dimensions up to the last one named 'layers' enumerate the layers, row-major: a stack
  # [G, ...] or the same stack cut into stages [S, G/S, ...].
  k = max((i + 1 for i, n in enumerate(names) if n == 'layers'), default=0)
  rest = names[k:]
  if k:
    slices = tuple(shape[:k])
    ids = (np.arange(math.prod(slices)).reshape(slices) * meta.get('layers_per_slice', 1)
           + meta.get('layer', 0))
    layers = ids.reshape(slices + (1,) * len(rest))
  elif 'layer' in meta:
    layers = np.asarray(meta['layer'])
  else:
    layers = None
  matrix = len(rest) >= 2 and role != 'bias' and 'norm' not in rest
  embedding = role in ('embedding', 'prompt') or (role is None and len(rest) >= 2
                                                  and rest[0] in _TABLE_AXES)
  return ParamRole(layers, matrix, embedding)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_roles(params) -> dict[str, ParamRole]:
  """The role of every parameter of `params` (nnx.Variables, e.g. nnx.state(model, nnx.Param),
  abstract or not), by path: the key that finds it again in a tree of plain arrays."""
  roles = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
    what = f'parameter {path_str(path)!r}'
    if not _is_variable(leaf):
      raise ValueError(
          f'{what} is a plain array: weight decay and layer-wise LR are read from the '
          f"parameters' metadata; pass the parameters with their Variables "
          f'(nnx.state(model, nnx.Param)) to make_optimizer(cfg, params)')
    roles[path_str(path)] = param_role(leaf, what)
  return roles


def _map_roles(fn, tree, roles: Mapping[str, ParamRole]):
  """fn(role, leaf) for every parameter of `tree`: Variables or the plain arrays that optax and
  nnx.Optimizer pass, found in `roles` by their path."""
  def one(path, leaf):
    key = path_str(path)
    if key not in roles:
      raise ValueError(f'parameter {key!r} is not among the parameters the optimizer was made '
                       f'for (make_optimizer(cfg, params))')
    return fn(roles[key], leaf)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def _count_layers(roles: Mapping[str, ParamRole]) -> int:
  return max((int(r.layers.max()) + 1 for r in roles.values() if r.layers is not None),
             default=0)


def decay_mask(params, decay_embeddings: bool = True,
               roles: Mapping[str, ParamRole] | None = None):
  """True where weight decay applies, per parameter (a bool for each Variable or array).

  `roles` (from `param_roles`) serves trees of plain arrays; without it `params` must hold the
  Variables.
  """
  roles = param_roles(params) if roles is None else roles
  return _map_roles(lambda r, _: r.matrix and (decay_embeddings or not r.embedding), params,
                    roles)


def num_layers(params) -> int:
  """L, the number of layers the parameters' metadata places them in (0 when none)."""
  return _count_layers(param_roles(params))


def layerwise_lr_scales(params, decay: float, roles: Mapping[str, ParamRole] | None = None):
  """Per-parameter LR factors: decay^(L - i) in layer i, decay^(L + 1) for embeddings, else 1.

  A stacked parameter gets a float32 array with one factor per slice of its layer dimensions
  (shape (n, 1, ..., 1) for a stack of n slices).
  """
  roles = param_roles(params) if roles is None else roles
  total = _count_layers(roles)
  return _map_roles(lambda role, _: _lr_factor(role, decay, total), params, roles)


def _lr_factor(role: ParamRole, decay: float, total: int):
  if role.layers is not None:
    return np.asarray(decay ** (total - role.layers.astype(np.float64)), np.float32)
  return decay ** (total + 1) if role.embedding else 1.0


# -------------------------------------------------------------------- transforms
def scale_by_layerwise_decay(decay: float, roles: Mapping[str, ParamRole] | None = None
                             ) -> optax.GradientTransformation:
  """Multiplies each update by its layer-wise LR factor (see `layerwise_lr_scales`).

  `roles` (from `param_roles`) serves updates that are plain arrays; without it the updates must
  hold the Variables (as gradients of an nnx.State do).
  """

  def update(updates, state, params=None):
    del params
    known = param_roles(updates) if roles is None else roles
    total = _count_layers(known)

    def scaled(role, u):  # u: an array, or a Variable holding one
      factor = _lr_factor(role, decay, total)
      return jax.tree.map(lambda x: x * jnp.asarray(factor, x.dtype), u)

    return _map_roles(scaled, updates, known), state

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


def _base_optimizer(cfg: OptimConfig, lr, roles) -> optax.GradientTransformation:
  # No mask without weight decay: decaying by 0 needs no metadata.
  mask = ((lambda params: decay_mask(params, cfg.decay_embeddings, roles))  # noqa: E731
          if cfg.weight_decay else None)
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
    params: the parameters with their metadata (an nnx.State of nnx.Param, abstract or not),
      from which weight decay and layer-wise LR decay are derived once; the transform then also
      takes them as plain arrays (as nnx.Optimizer and optax pass them). Without `params`, weight
      decay and layer-wise LR decay read the metadata of the trees they are given, which must
      then hold the Variables (gradients of an nnx.State do).
  Returns:
    An optax transform; its `update` needs `params` when EMA or weight decay is on. Works with
    `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
  """
  roles = None
  if params is not None and (cfg.weight_decay or cfg.layerwise_lr_decay is not None):
    roles = param_roles(params)
  if cfg.layerwise_lr_decay is not None and roles is not None and not _count_layers(roles):
    raise ConfigError(
        f'optim.layerwise_lr_decay={cfg.layerwise_lr_decay!r} is invalid: no parameter lies in a '
        f"layer (a dimension named 'layers', or 'layer' metadata)")
  parts = []
  if cfg.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(_base_optimizer(cfg, schedules.make_schedule(cfg), roles))
  if cfg.layerwise_lr_decay is not None:
    parts.append(scale_by_layerwise_decay(cfg.layerwise_lr_decay, roles))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if cfg.ema_decay is not None:
    tx = with_ema(tx, cfg.ema_decay)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
  if cfg.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
  return tx
