"""Which parameters train, and how the model's parameters are made from the train state.

A `ParamPlan` is built from the experiment and the model's abstract parameters (before anything
is allocated). It splits the model's parameters into

  trainable  the train state's 'params': what the optimizer updates and checkpoints hold
  frozen     the train state's 'frozen': laid out on the mesh like the rest of the state, passed
             through the step unchanged, never checkpointed (it is rebuilt from
             `finetune.init_from` at every start)

and makes the model's full parameter tree inside the jitted steps (`model_params`), with
`compress.qat`'s fake quantization (straight-through estimator) applied to it last.

  finetune.method   trainable                                  frozen
  'full'            every parameter (the state is unchanged     nothing
                    from training without a plan)
  'lora'            {'base': train_also + fresh, 'lora': A, B}  the other parameters
  'qlora'           as 'lora'                                  as 'lora', the LoRA targets as
                                                                int4/int8 codes (qwix QArray)
  'modules'         {'base': model.peft's parameters           the other parameters
                    (role adapter / prefix / prompt) + train_also + fresh, 'lora': {}}

'fresh' are the parameters the `init_from` source does not have (a new task head): they start
from their initialisation and always train. Under 'full', `finetune.unfreeze` masks gradients
and updates by layer group (`update_mask`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.compress import quant
from jaxformer.config import ConfigError
from jaxformer.finetune import lora
from jaxformer.finetune.config import LORA_METHODS
from jaxformer.parallel.sharding import names_of
from jaxformer.train import optimizer as optim_lib

log = logging.getLogger('jaxformer')

PEFT_ROLES = ('adapter', 'prefix', 'prompt')


class ParamPlan:
  """See the module docstring. `fresh`: paths ('.'-joined) the init_from source lacks."""

  def __init__(self, finetune, abstract_params: nnx.State, *, fresh: Iterable[str] = (),
               qat=None):
    self.cfg = finetune
    self.method = finetune.method
    flat = nnx.to_flat_state(abstract_params)
    self.paths = [p for p, _ in flat]
    self.templates = {lora.path_key(p): v for p, v in flat}
    self.fresh = frozenset(fresh)
    self.targets: dict[str, tuple] = {}
    self.scale = 0.0
    self.dropout = 0.0
    if self.method in LORA_METHODS:
      lc = finetune.lora
      self.targets = lora.select_targets(self.templates, lc.targets, lc.rank)
      for axes in self.targets.values():
        lora.check_layout(axes)
      self.scale = lc.alpha / lc.rank
    self.dropout = finetune.lora.dropout if self.targets else 0.0
    self.trainable_base = self._trainable_base()
    # compress.qat: the model sees its quantized parameters (compress/quant.py, fake_quant).
    self.qat = qat.scheme() if qat is not None and qat.enabled else None
    self.qat_targets = ({} if self.qat is None else
                        quant.targets(self.templates, self.qat, 'compress.qat.'))
    self.groups = self._groups(abstract_params) if finetune.unfreeze else None

  # ---------------------------------------------------------------- which parameters train
  @property
  def full(self) -> bool:
    return self.method == 'full'

  def _trainable_base(self) -> frozenset[str]:
    keys = set(self.templates)
    if self.full:
      return frozenset(keys)
    also = re.compile(self.cfg.train_also) if self.cfg.train_also else None
    chosen = {k for k in keys if k in self.fresh or (also is not None and also.search(k))}
    if self.method == 'modules':
      peft = {k for k, v in self.templates.items()
              if v.get_metadata().get('role') in PEFT_ROLES}
      if not peft:
        raise ConfigError(
            "finetune.method='modules' trains the parameters model.peft adds (adapters, "
            'prefixes, prompts), and this model has none: set model.peft (e.g. '
            'model.peft.adapter_dim) or use another finetune.method')
      chosen |= peft
    if also is not None and not any(also.search(k) for k in keys):
      raise ConfigError(f'finetune.train_also={self.cfg.train_also!r} matches no parameter; '
                        f'parameter paths are {sorted(keys)}')
    return frozenset(chosen - set(self.targets))

  def _is_trainable(self, path, _) -> bool:
    return lora.path_key(path) in self.trainable_base

  def _is_target(self, path, _) -> bool:
    return lora.path_key(path) in self.targets

  def num_trainable(self, abstract_trainable) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_trainable))

  # ---------------------------------------------------------------- the two trees
  def split(self, params: nnx.State, key: jax.Array | None = None) -> tuple[Any, Any]:
    """Full model parameters -> (trainable, frozen); new LoRA factors from `key`.

    Traceable: TrainProgram runs it under jit with the state's shardings as outputs."""
    if self.full:
      return params, None
    base, rest = nnx.split_state(params, self._is_trainable, ...)
    factors = {}
    if self.targets:
      flat = lora.flat_params(params)
      factors = lora.lora_factors(flat, self.targets, self.cfg.lora.rank,
                                  jax.random.key(0) if key is None else key)
    frozen: dict[str, Any] = {'params': rest}
    if self.method == 'qlora':
      targets, others = nnx.split_state(rest, self._is_target, ...)
      lc = self.cfg.lora
      frozen = {'params': others, 'codes': {
          k: lora.quantize_base(v.get_value(), self.targets[k], lc.base_bits,
                                lc.base_group_size, k)
          for k, v in lora.flat_params(targets).items()}}
    return {'base': base, 'lora': factors}, frozen

  def model_params(self, trainable, frozen, *, fake_quant: bool = True) -> nnx.State:
    """The model's full parameter tree (inside the jitted steps, or eagerly for export), with
    compress.qat's fake quantization unless `fake_quant` is False."""
    full = self._merged(trainable, frozen)
    if self.qat is None or not fake_quant:
      return full
    return quant.fake_quant_params(full, self.qat_targets, self.qat)

  def attach_dropout(self, model: nnx.Module, trainable, key: jax.Array) -> None:
    """LoRA dropout in a training step: the model (built from `model_params`) gets each
    target's low-rank path with its dropout key (lora.attach_dropout_paths). No-op without
    finetune.lora.dropout."""
    if self.dropout:
      lora.attach_dropout_paths(model, trainable['lora'], self.targets, key, self.dropout,
                                self.scale)

  def view_params(self, view, *, fake_quant: bool = True) -> nnx.State:
    """`model_params` of `TrainProgram.model_view(state)`."""
    if self.full:
      return self.model_params(view, None, fake_quant=fake_quant)
    return self.model_params(view['params'], view['frozen'], fake_quant=fake_quant)

  def _merged(self, trainable, frozen) -> nnx.State:
    if self.full:
      return trainable
    flat = dict(lora.flat_params(trainable['base']))
    # New Variables for the frozen values: those passed in belong to the trace level of the
    # caller, not to the gradient's, where nnx rebuilds the model.
    flat.update({k: v.replace(v.get_value())
                 for k, v in lora.flat_params(frozen['params']).items()})
    for k, q in frozen.get('codes', {}).items():
      t = self.templates[k]
      flat[k] = t.replace(lora.dequantize_base(q, t.get_value().shape, t.get_value().dtype))
    if trainable['lora']:
      values = lora.apply({k: flat[k].get_value() for k in self.targets},
                          {k: {n: f[n].get_value() for n in f}
                           for k, f in trainable['lora'].items()},
                          self.targets, self.scale)
      flat.update({k: flat[k].replace(v) for k, v in values.items()})
    return nnx.from_flat_state([(p, flat[lora.path_key(p)]) for p in self.paths])

  def shardings(self, abstract_trainable, abstract_frozen, layout) -> tuple[Any, Any]:
    """Shardings of (trainable, frozen): parameters and LoRA factors by their logical names,
    QLoRA codes like their matrix, their scales replicated."""
    train = layout.state_shardings(abstract_trainable)
    if abstract_frozen is None:
      return train, None
    frozen: dict[str, Any] = {'params': layout.state_shardings(abstract_frozen['params'])}
    if 'codes' in abstract_frozen:
      frozen['codes'] = {}
      for k, q in abstract_frozen['codes'].items():
        t = self.templates[k]
        shape, names = lora.base_layout(t.get_value().shape, names_of(t), self.targets[k],
                                        self.cfg.lora.base_group_size, k)
        codes = nnx.Param(jax.ShapeDtypeStruct(shape, jnp.int8), out_sharding=names,
                          eager_sharding=False)
        w = layout.variable_sharding(codes, f'the int codes of {k!r}')
        frozen['codes'][k] = jax.tree.map(
            lambda x, w=w, shape=shape: w if x.shape == shape else layout.replicated, q)
    return train, frozen

  # ---------------------------------------------------------------- gradual unfreezing
  def _groups(self, abstract_params: nnx.State):
    """Per parameter (per layer slice when stacked): its group from the top (see
    jaxformer/finetune/config.py), as an int32 array broadcasting against it."""
    roles = optim_lib.param_roles(abstract_params)
    total = optim_lib._count_layers(roles)  # pylint: disable=protected-access

    def group(role):
      if role.embedding:
        return np.asarray(total + 1, np.int32)
      if role.layers is not None:
        return (1 + (total - 1 - role.layers)).astype(np.int32)
      return np.asarray(0, np.int32)

    return optim_lib._map_roles(lambda r, v: v.replace(group(r)), abstract_params, roles)  # pylint: disable=protected-access

  def update_mask(self, step: jax.Array):
    """1 where a parameter trains at `step` under finetune.unfreeze (None: everything)."""
    if self.groups is None:
      return None
    starts = jnp.asarray([s[0] for s in self.cfg.unfreeze], jnp.int32)
    counts = jnp.asarray([s[1] for s in self.cfg.unfreeze], jnp.int32)
    k = counts[jnp.searchsorted(starts, step, side='right') - 1]
    return jax.tree.map(lambda g: (jnp.asarray(g) < k), self.groups)

  def masked(self, tree, mask):
    """`tree` (gradients or updates) with the frozen groups zeroed."""
    if mask is None:
      return tree
    return jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, mask)


def describe(plan: ParamPlan, abstract_trainable, total: int) -> str:
  n = plan.num_trainable(abstract_trainable)
  return (f'finetune.method={plan.method!r}: {n:,} trainable parameters of {total:,} '
          f'({100.0 * n / max(total, 1):.3g}%)')
