"""Mixed precision (CATALOG F4): dynamic loss scaling and dtype casting of parameter trees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.train import precision
from jaxformer.train.optimizer import OptimConfig


def _scale(interval=3):
  return precision.make_loss_scale(OptimConfig(loss_scale='dynamic', loss_scale_init=2.0 ** 10,
                                               loss_scale_growth_interval=interval))


def test_no_loss_scale_unless_asked():
  assert precision.make_loss_scale(OptimConfig()) is None


def test_scale_halves_on_nonfinite_and_grows_after_finite_steps():
  finite_loss = lambda p: jnp.sum(p ** 2)
  inf_loss = lambda p: jnp.sum(p * jnp.inf)
  p = jnp.ones((3,))
  step_finite = jax.jit(lambda s, p: s.value_and_grad(finite_loss)(p))
  step_inf = jax.jit(lambda s, p: s.value_and_grad(inf_loss)(p))

  scale = _scale(interval=3)
  scale, finite, _, _ = step_inf(scale, p)
  assert not bool(finite) and float(scale.scale) == 2.0 ** 9 and int(scale.fin_steps) == 0
  # flax's rule: growth_interval finite steps in a row arm the growth, the next finite one doubles
  for _ in range(3):
    scale, finite, _, _ = step_finite(scale, p)
    assert bool(finite) and float(scale.scale) == 2.0 ** 9
  scale, _, _, _ = step_finite(scale, p)
  assert float(scale.scale) == 2.0 ** 10 and int(scale.fin_steps) == 0
  # a non-finite step resets the run of finite ones
  scale, _, _, _ = step_finite(scale, p)
  scale, _, _, _ = step_inf(scale, p)
  assert float(scale.scale) == 2.0 ** 9 and int(scale.fin_steps) == 0


def test_unscaled_grads_equal_fp32_grads_on_nnx_split_params():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(1), (5, 4))

  def loss_fn(p):
    return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

  _, finite, loss, grads = _scale().value_and_grad(loss_fn)(params)
  want = jax.grad(loss_fn)(params)
  assert bool(finite)
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)
  chex.assert_trees_all_close(nnx.as_pure(grads), nnx.as_pure(want), rtol=1e-6, atol=0)


def test_fp16_gradients_underflow_without_scaling_and_survive_with_it():
  """Cotangents of size 1e-8 flush to zero in float16; scaled by 2^15 they do not."""
  w = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)
  x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)

  def loss_fn(w):
    h = precision.cast_floating(x, jnp.float16) * precision.cast_floating(w, jnp.float16)
    return jnp.sum(h).astype(jnp.float32) * 1e-8

  raw = jax.grad(loss_fn)(w)
  np.testing.assert_array_equal(raw, 0.0)
  scale = precision.make_loss_scale(OptimConfig(loss_scale='dynamic', loss_scale_init=2.0 ** 15))
  _, finite, _, grads = scale.value_and_grad(loss_fn)(w)
  assert bool(finite) and grads.dtype == jnp.float32
  np.testing.assert_allclose(grads, 1e-8 * np.asarray(x, np.float64), rtol=2e-3)


def test_select_tree_keeps_old_state_on_skipped_step():
  old = {'a': jnp.zeros(2), 'n': jnp.array(3)}
  new = {'a': jnp.ones(2), 'n': jnp.array(4)}
  chex.assert_trees_all_equal(precision.select_tree(jnp.array(False), new, old), old)
  chex.assert_trees_all_equal(precision.select_tree(jnp.array(True), new, old), new)
  assert not bool(precision.all_finite({'a': jnp.array([1.0, jnp.nan])}))
  assert bool(precision.all_finite({'a': jnp.ones(2), 'i': jnp.arange(2)}))


def test_cast_floating_and_policy():
  model = nnx.Sequential(nnx.Embed(5, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  tree = {'params': nnx.as_pure(state), 'step': jnp.array(3, jnp.int32)}
  policy = precision.Policy.from_model_config(ModelConfig(dtype='bfloat16'))
  assert policy.param_dtype == jnp.float32 and policy.compute_dtype == jnp.bfloat16
  assert not policy.needs_loss_scale
  assert precision.Policy.from_names(compute='float16').needs_loss_scale
  cast = policy.cast_to_compute(tree)
  assert {x.dtype for x in jax.tree.leaves(cast['params'])} == {jnp.dtype(jnp.bfloat16)}
  assert cast['step'].dtype == jnp.int32
  back = policy.cast_to_param(cast)
  assert {x.dtype for x in jax.tree.leaves(back['params'])} == {jnp.dtype(jnp.float32)}
  # the cast also goes through nnx.Variables (an nnx.State straight from nnx.split)
  cast_state = precision.cast_floating(state, jnp.bfloat16)
  assert isinstance(cast_state, nnx.State)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast_state))
