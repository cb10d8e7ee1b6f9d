"""Generic properties (CATALOG A, preamble) for every registered attention kind.

Parameterised over `registry.entries()` (every kind x impl), so a new kind is tested as soon as it
registers; a property runs only where the kind declares the feature it needs (`core.features`).
Each kind is built with its `example_options` (small block sizes and the like for T = 8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, registry
from jaxformer.config import ModelConfig

D, B, T = 32, 2, 8
KINDS = [f'{kind}/{impl}' for kind, impl in registry.entries()]


def make(kind, causal=True, rngs=None):
  kind, impl = kind.split('/')
  cls = registry.lookup(kind, impl)
  cfg = ModelConfig.from_dict({
      'd_model': D, 'max_length': T, 'position': {'kind': 'rope'},
      'attention': {'kind': kind, 'impl': impl, 'num_heads': 4, 'num_kv_heads': 2,
                    'options': dict(getattr(cls, 'example_options', {}))}})
  return Attention(cfg, causal=causal, rngs=rngs if rngs is not None else nnx.Rngs(0))


def features(kind):
  return registry.lookup(*kind.split('/')).features


def needs(kind, *feats):
  missing = set(feats) - set(features(kind))
  if missing:
    pytest.skip(f'{kind} does not declare {sorted(missing)}')


def inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


@pytest.mark.parametrize('kind', KINDS)
def test_causality_outputs_and_gradients(kind):
  needs(kind, 'causal')
  m = make(kind)
  f = nnx.jit(lambda m, x: m(x, AttentionMask())[0])
  x = inputs()
  t0 = 4
  changed = x.at[:, t0 + 1:].set(jax.random.normal(jax.random.key(1), (B, T - t0 - 1, D)))
  np.testing.assert_allclose(f(m, changed)[:, :t0 + 1], f(m, x)[:, :t0 + 1], atol=1e-6)
  jac = jax.jit(jax.jacrev(lambda x: m(x, AttentionMask())[0][0].sum(-1)))(x[:1])
  jac = np.abs(np.asarray(jac)[:, 0]).sum(-1)  # |d out[0, t] / d x[0, s, :]| as [T, S]
  assert np.all(jac[np.triu_indices(T, 1)] == 0.0)
  # Not vacuous: every output depends on some visible input (sparse kinds see a subset of the
  # past, so not every s <= t needs to matter).
  assert np.all(jac.max(axis=1) > 0.0)


@pytest.mark.parametrize('kind', KINDS)
def test_batch_rows_are_independent_under_jit(kind):
  """Row 1 never influences row 0, in the output or in the gradient (jitted: a miscompiled
  reduction once leaked gradients between the rows of the LSH kind, see jaxformer/xla_guard.py)."""
  m = make(kind, causal='causal' in features(kind))
  x = inputs()
  f = nnx.jit(lambda m, x: m(x, AttentionMask())[0])
  other = x.at[1].set(jax.random.normal(jax.random.key(3), (T, D)))
  np.testing.assert_allclose(f(m, other)[0], f(m, x)[0], atol=1e-6)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(m(x, AttentionMask())[0][0] ** 2)))(x)
  assert np.all(np.asarray(grad[1]) == 0.0), 'row 0 of the output depends on row 1'
  assert np.abs(np.asarray(grad[0])).max() > 0.0


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('causal', [False, True])
def test_padding_invariance(kind, causal):
  needs(kind, 'padding', *(['causal'] if causal else []))
  m = make(kind, causal=causal)
  f = nnx.jit(lambda m, x, mask: m(x, mask)[0])
  pad = jnp.array([[1] * T, [1] * 5 + [0] * 3], bool)
  mask = AttentionMask.build(q_len=T, padding=pad)
  x = inputs()
  junk = x.at[1, 5:].set(100.0 * jax.random.normal(jax.random.key(2), (3, D)))
  np.testing.assert_allclose(f(m, junk, mask)[1, :5], f(m, x, mask)[1, :5], atol=1e-5)
  np.testing.assert_allclose(f(m, junk, mask)[0], f(m, x, mask)[0], atol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_jit_equals_eager(kind):
  m = make(kind, causal='causal' in features(kind))
  x = inputs()
  eager = m(x, AttentionMask())[0]
  jitted = nnx.jit(lambda m, x: m(x, AttentionMask())[0])(m, x)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_remat_equals_plain(kind):
  m = make(kind, causal='causal' in features(kind))
  x = inputs()

  def loss(m, x, remat):
    call = lambda m, x: m(x, AttentionMask())[0]
    if remat:
      call = nnx.remat(call)
    return jnp.sum(call(m, x) ** 2)

  grad = lambda remat: nnx.jit(nnx.value_and_grad(lambda m, x: loss(m, x, remat)))(m, x)
  (l0, g0), (l1, g1) = grad(False), grad(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               nnx.state(g1), nnx.state(g0))


@pytest.mark.parametrize('kind', KINDS)
def test_scan_over_layers_equals_unrolled(kind):
  causal = 'causal' in features(kind)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_stack(rngs):
    return make(kind, causal=causal, rngs=rngs)

  layers = make_stack(nnx.Rngs(0))
  x = inputs()

  @nnx.jit
  def scanned(layers, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, length=3)
    def body(h, layer):
      return h + layer(h, AttentionMask())[0]
    return body(x, layers)

  graphdef, state = nnx.split(layers)
  h = x
  for i in range(3):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    h = h + layer(h, AttentionMask())[0]
  np.testing.assert_allclose(scanned(layers, x), h, atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_kv_cache_equals_full(kind):
  needs(kind, 'causal', 'decode')
  m = make(kind)
  call = nnx.jit(lambda m, x, cache: m(x, AttentionMask(), cache=cache))
  x = inputs()
  full, _ = call(m, x, None)
  cache = m.init_cache(B, T)
  y0, cache = call(m, x[:, :3], cache)
  outs = [y0]
  for i in range(3, T):
    y, cache = call(m, x[:, i:i + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)
