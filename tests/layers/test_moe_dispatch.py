"""MoE dispatchers (model.moe.dispatch): ragged and capacity against the dense oracle (outputs
and gradients wrt the input and every parameter), the capacity drop rule against a numpy loop,
aux losses independent of the dispatcher, padding, and the config errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_moe import B, E, T, _cfg, _loop_capacity, _randomise, _x

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers import MoE

DISPATCH = ('dense', 'capacity', 'ragged')


def _pair(dispatch, seed=0, **moe):
  """(oracle MoE with dense dispatch, MoE with `dispatch`) sharing the same random weights."""
  ref = _randomise(MoE(_cfg(dispatch='dense', **moe), rngs=nnx.Rngs(seed)))
  other = MoE(_cfg(dispatch=dispatch, **moe), rngs=nnx.Rngs(seed))
  nnx.update(other, nnx.state(ref, nnx.Param))
  return ref, other


def _mask():
  valid = np.ones((B, T), bool)
  valid[1, 5:] = False
  return jnp.asarray(valid)


@nnx.jit
def _value_and_grads(moe, x, mask, ids):
  def loss(moe, x):
    y, aux = moe(x, mask=mask, token_ids=ids)
    # A random projection, so every output coordinate gets its own cotangent.
    proj = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
    return jnp.sum(y * proj), (y, aux)

  (_, (y, aux)), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      moe, x)
  return y, aux, nnx.state(g_params, nnx.Param), g_x


def _run(moe, seed=0):
  x = jnp.asarray(_x(seed), jnp.float32)
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, 50, (B, T)))
  return _value_and_grads(moe, x, _mask(), ids)


@pytest.mark.parametrize('dispatch', ['ragged', 'capacity'])
@pytest.mark.parametrize('router,gated,bias', [
    ('topk', True, False), ('topk', False, True), ('switch', True, True), ('hash', False, True)])
def test_dropless_dispatch_equals_dense_with_gradients(dispatch, router, gated, bias):
  # capacity_factor E / k gives C = T slots: nothing can drop, so capacity must equal dense too.
  k = 2 if router == 'topk' else 1
  ref, moe = _pair(dispatch, router=router, gated=gated, bias=bias, act='gelu',
                   capacity_factor=E / k)
  if dispatch == 'capacity':
    assert moe.capacity(T) == T
  y0, aux0, g0, gx0 = _run(ref)
  y1, aux1, g1, gx1 = _run(moe)
  chex.assert_trees_all_close(y1, y0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(gx1, gx0, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g1, g0, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(g1['wo'][...]).max()) > 0.0
  if router != 'hash':
    assert float(jnp.abs(g1['router'][...]).max()) > 0.0
  # The losses come from the router alone: identical, not just close.
  for key in aux0:
    np.testing.assert_array_equal(aux1[key], aux0[key])


@pytest.mark.parametrize('router', ['topk', 'switch'])
def test_capacity_drops_match_numpy_rule(router):
  cfg = _cfg(router=router, capacity_factor=0.5, dispatch='capacity')
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = _x(2)
  valid = np.asarray(_mask())
  cap = moe.capacity(T)
  assert cap == (2 if router == 'topk' else 1)  # ceil(0.5 * k * 8 / 4)
  ref, kept = _loop_capacity(moe, cfg, x, valid, cap)
  assert (~kept[valid]).sum() >= 4, 'the case must actually drop assignments'
  y, _ = nnx.jit(lambda m, x, v: m(x, mask=v))(moe, jnp.asarray(x, jnp.float32),
                                               jnp.asarray(valid))
  chex.assert_trees_all_close(np.asarray(y), ref.astype(np.float32), atol=1e-5, rtol=1e-5)
  fully_dropped = valid & ~kept.any(-1)
  np.testing.assert_array_equal(np.asarray(y)[fully_dropped | ~valid], 0.0)


@pytest.mark.parametrize('dispatch', DISPATCH)
def test_padding_takes_no_capacity_and_outputs_zero(dispatch):
  cfg = _cfg(capacity_factor=1.0, dispatch=dispatch)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = _x(4)
  valid = np.ones((B, T), bool)
  valid[:, :3] = False  # leading padding would claim slots first if it counted
  apply = nnx.jit(lambda m, x, v: m(x, mask=v))
  y, _ = apply(moe, jnp.asarray(x, jnp.float32), jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(y)[~valid], 0.0)
  if dispatch == 'capacity':
    ref, _ = _loop_capacity(moe, cfg, x, valid, moe.capacity(T))
    chex.assert_trees_all_close(np.asarray(y), ref.astype(np.float32), atol=1e-5, rtol=1e-5)
  x2 = x.copy()
  x2[~valid] = 100.0 * _x(5)[~valid]
  y2, _ = apply(moe, jnp.asarray(x2, jnp.float32), jnp.asarray(valid))
  chex.assert_trees_all_close(y2, y, atol=1e-6)


def test_auto_dispatch_and_config_errors():
  assert MoE(_cfg(), rngs=nnx.Rngs(0)).dispatch == 'dense'
  assert MoE(_cfg(router='switch'), rngs=nnx.Rngs(0)).dispatch == 'capacity'
  assert MoE(_cfg(router='hash'), rngs=nnx.Rngs(0)).dispatch == 'dense'
  with pytest.raises(ConfigError, match=r"model.moe.dispatch='sparse' is invalid: allowed"):
    ModelConfig.from_dict({'moe': {'num_experts': 4, 'dispatch': 'sparse'}})
  with pytest.raises(ConfigError, match='model.moe.dispatch'):
    ModelConfig.from_dict({'family': 'encoder',
                           'moe': {'num_experts': 4, 'router': 'soft', 'dispatch': 'ragged'}})


@pytest.mark.parametrize('sizes,rows', [
    ([10, 0, 25, 3], 40),          # an empty group; two rows past the sum
    ([0, 0, 17], 17),              # everything in the last group
    ([1, 2, 3, 4, 5], 100),        # most rows past the sum
    (None, 256),                   # 8 groups of random sizes, blocks of 16 rows
])
def test_blocked_grouped_matmul_equals_ragged_dot(sizes, rows):
  """The CPU grouped matmul (padded blocks) against `jax.lax.ragged_dot`: values and
  gradients of x and w on the rows inside the groups."""
  from jaxformer.layers.moe_dispatch import blocked_grouped_matmul  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(rows)
  if sizes is None:
    sizes = rng.multinomial(rows, np.ones(8) / 8)
  sizes = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(sizes.shape[0], 6, 5)), jnp.float32)
  total = int(sizes.sum())
  blocked = lambda x, w: blocked_grouped_matmul(x, w, sizes)[:total]  # noqa: E731
  ragged = lambda x, w: jax.lax.ragged_dot(x, w, sizes)[:total]  # noqa: E731
  chex.assert_trees_all_close(jax.jit(blocked)(x, w), ragged(x, w), atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  chex.assert_trees_all_close(jax.grad(loss(blocked), (0, 1))(x, w),
                              jax.grad(loss(ragged), (0, 1))(x, w), atol=1e-5)
  assert jnp.all(blocked_grouped_matmul(x, w, sizes)[total:] == 0)
