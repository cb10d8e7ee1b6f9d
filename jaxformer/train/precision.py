"""Mixed precision (CATALOG F4): fp32 master parameters, bf16/fp16 compute, fp16 loss scaling.

Micikevicius et al. 2018 ("Mixed Precision Training"): keep parameters and optimizer state in
float32, cast them to the compute dtype for the forward/backward pass, and for float16 multiply
the loss by a scale S before differentiation so small gradients do not flush to zero:
  g = grad(S * loss) / S.
Dynamic scaling halves S when g has a NaN/Inf (that step is skipped) and doubles it after
`growth_interval` finite steps in a row. bfloat16 has float32's exponent range and needs no
scaling.

The loss scale is flax's `DynamicScale` (re-exported as `DynamicLossScale`); its
`value_and_grad(fun)(params)` works on any pytree, an `nnx.split` State included:

  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = lambda p: loss(nnx.merge(graphdef, cast_floating(p, jnp.float16)))
  scale, finite, loss, grads = scale.value_and_grad(loss_fn)(params)   # grads in float32
  params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

from jaxformer.config import DTYPES

if typing.TYPE_CHECKING:
  from jaxformer.config import ModelConfig
  from jaxformer.train.optimizer import OptimConfig

DynamicLossScale = DynamicScale


def make_loss_scale(cfg: 'OptimConfig') -> DynamicScale | None:
  """The dynamic loss scale asked for by `cfg.loss_scale` ('dynamic'), or None ('none')."""
  if cfg.loss_scale == 'none':
    return None
  return DynamicScale(growth_interval=cfg.loss_scale_growth_interval,
                      fin_steps=jnp.zeros([], jnp.int32),
                      scale=jnp.asarray(cfg.loss_scale_init, jnp.float32))


def cast_floating(tree, dtype):
  """Casts the floating-point leaves of `tree` to `dtype`; integer and bool leaves are kept."""
  if dtype is None:
    return tree

  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def all_finite(tree) -> jax.Array:
  """True when no leaf holds a NaN or Inf."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else (
      jnp.array(True))


def select_tree(pred: jax.Array, on_true, on_false):
  """Leafwise `where(pred, on_true, on_false)`: keep the old state on a skipped step."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtype parameters are stored in, computed in, and returned in (jmp's Policy)."""
  param_dtype: typing.Any = jnp.float32
  compute_dtype: typing.Any = jnp.float32
  output_dtype: typing.Any = jnp.float32

  @classmethod
  def from_names(cls, param: str = 'float32', compute: str = 'float32',
                 output: str = 'float32') -> 'Policy':
    return cls(DTYPES[param], DTYPES[compute], DTYPES[output])

  @classmethod
  def from_model_config(cls, cfg: 'ModelConfig') -> 'Policy':
    """model.param_dtype / model.dtype; outputs (logits for the loss) in float32."""
    return cls(cfg.params_dtype, cfg.compute_dtype, jnp.float32)

  @property
  def needs_loss_scale(self) -> bool:
    return jnp.dtype(self.compute_dtype) == jnp.float16

  def cast_to_compute(self, tree):
    return cast_floating(tree, self.compute_dtype)

  def cast_to_param(self, tree):
    return cast_floating(tree, self.param_dtype)

  def cast_to_output(self, tree):
    return cast_floating(tree, self.output_dtype)

