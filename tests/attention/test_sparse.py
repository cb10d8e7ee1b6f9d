"""Sparse attention kinds (CATALOG B1-B5) against masked dense attention.

The oracle is `core.dot_product_attention` with the kind's pattern as the AttentionMask's extra
mask, the pattern written out here in numpy from the papers' definitions (BigBird's from the
exported `bigbird_block_mask`). Outputs and gradients must agree at fp32 atol 1e-5 for lengths
that are not multiples of the block size, GQA, padding and packed segments, causal or not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.sparse import bigbird_block_mask
from jaxformer.config import AttentionConfig, ConfigError, ModelConfig

H = 8


def core(kind, **options):
  cfg = AttentionConfig(kind=kind, options=options)
  return registry.build(cfg, num_heads=4, num_kv_heads=2, head_dim=H, rngs=nnx.Rngs(0))


def pattern(kind, opts, t, s, causal, heads=4):
  """The kind's element pattern [1, N|1, T, S] in numpy, from the paper's definition."""
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  d = i - j
  if kind == 'local':
    p = np.abs(d) < opts['window']
  elif kind == 'dilated':
    dil = np.atleast_1d(opts['dilation'])
    r = np.array([dil[n % len(dil)] for n in range(heads)])[:, None, None]
    p = (d % r == 0) & (np.abs(d) < opts['window'] * r)
  elif kind == 'longformer':
    g = opts['global_tokens']
    p = (np.abs(d) < opts['window']) | (i < g) | (j < g)
  elif kind == 'bigbird':
    b = opts['block_size']
    m = bigbird_block_mask(-(-max(t, s) // b), causal=causal, **{
        k: opts[k] for k in ('window_blocks', 'global_blocks', 'random_blocks', 'seed')})
    p = m[i // b, j // b]
  elif opts['pattern'] == 'strided':
    p = (np.abs(d) <= opts['stride']) | (d % opts['stride'] == 0)
  else:
    l, c = opts['stride'], opts['summary']
    p = (i // l == j // l) | (j % l >= l - c)
  p = p if p.ndim == 3 else p[None]
  return jnp.asarray(p[None])


CASES = {
    'local': {'window': 3, 'block_size': 4},
    'dilated': {'window': 3, 'dilation': 2, 'block_size': 3},
    'dilated_heads': {'window': 2, 'dilation': (1, 3), 'block_size': 4},
    'longformer': {'window': 2, 'global_tokens': 3, 'block_size': 4},
    'bigbird': {'block_size': 2, 'window_blocks': 1, 'global_blocks': 1, 'random_blocks': 2,
                'seed': 3},
    'strided': {'pattern': 'strided', 'stride': 3, 'summary': 1, 'block_size': 2},
    'strided_wide': {'pattern': 'strided', 'stride': 2, 'summary': 1, 'block_size': 5},
    'fixed': {'pattern': 'fixed', 'stride': 4, 'summary': 2, 'block_size': 3},
}
KIND = {'dilated_heads': 'dilated', 'strided': 'sparse_transformer',
        'strided_wide': 'sparse_transformer', 'fixed': 'sparse_transformer'}


def qkv(b, t, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, 4, H)), jax.random.normal(ks[1], (b, t, 2, H)),
          jax.random.normal(ks[2], (b, t, 2, H)))


def masks(t, causal, segments):
  if not segments:
    return AttentionMask(causal=causal)
  # Row 0 packs two segments, row 1 ends in padding.
  seg = np.ones((2, t), np.int32)
  seg[0, t // 2:] = 2
  seg[1, t - 3:] = 0
  return AttentionMask.build(q_len=t, segment_ids=jnp.asarray(seg), causal=causal)


def check_against_oracle(m, kind, opts, q, k, v, mask):
  """Outputs and input gradients (for a random cotangent) equal the masked dense oracle's."""
  t, s = q.shape[1], k.shape[1]
  oracle_mask = mask.replace(extra=pattern(kind, opts, t, s, mask.causal))
  cot = jax.random.normal(jax.random.key(9), q.shape)

  @jax.jit
  def both(q, k, v):
    results = []
    for f in (lambda q, k, v: m(q, k, v, mask),
              lambda q, k, v: dot_product_attention(q, k, v, oracle_mask)):
      out, vjp = jax.vjp(f, q, k, v)
      results.append((out, vjp(cot)))
    return results

  got, want = both(q, k, v)
  if mask.q_segment_ids is not None:  # padded queries see nothing: exactly 0, never NaN
    assert np.all(np.isfinite(got[0])) and np.all(got[0][1, -3:] == 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('t, segments, causal', [(11, True, False), (11, True, True),
                                                 (16, False, True)])
def test_equals_masked_dense(case, t, segments, causal):
  kind, opts = KIND.get(case, case), CASES[case]
  q, k, v = qkv(2, t)
  check_against_oracle(core(kind, **opts), kind, opts, q, k, v, masks(t, causal, segments))


@pytest.mark.parametrize('case', ['local', 'longformer', 'bigbird', 'fixed'])
def test_decode_rows_equal_full_rows(case):
  """T new queries over S cache slots (positions as in decoding) equal the full pass's rows."""
  kind, opts = KIND.get(case, case), CASES[case]
  m = core(kind, **opts)
  q, k, v = qkv(2, 13, seed=1)
  full = jax.jit(lambda q, k, v: m(q, k, v, AttentionMask(causal=True)))(q, k, v)
  step = AttentionMask(q_positions=jnp.arange(10, 13)[None], causal=True)
  rows = jax.jit(lambda q, k, v: m(q, k, v, step))(q[:, 10:], k, v)
  np.testing.assert_allclose(rows, full[:, 10:], atol=1e-5)


@pytest.mark.parametrize('case', ['dilated_heads', 'longformer', 'strided', 'fixed'])
def test_extra_mask_with_heads(case):
  """An arbitrary per-head extra mask reaches every pass (blocks, strided, shared, global)."""
  kind, opts = KIND.get(case, case), CASES[case]
  q, k, v = qkv(2, 11, seed=3)
  extra = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 4, 11, 11))
  mask = masks(11, True, True).replace(extra=extra)
  m = core(kind, **opts)
  want = dot_product_attention(q, k, v, mask.replace(
      extra=extra & pattern(kind, opts, 11, 11, True)))
  np.testing.assert_allclose(jax.jit(lambda q, k, v: m(q, k, v, mask))(q, k, v), want, atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_degenerate_patterns_equal_full_or_local(causal):
  q, k, v = qkv(2, 11, seed=2)
  mask = AttentionMask(causal=causal)
  full = dot_product_attention(q, k, v, mask)
  local = core('local', window=3, block_size=4)(q, k, v, mask)
  same = dict(atol=1e-5)
  np.testing.assert_allclose(core('local', window=11, block_size=4)(q, k, v, mask), full, **same)
  np.testing.assert_allclose(
      core('dilated', window=3, dilation=1, block_size=3)(q, k, v, mask), local, **same)
  np.testing.assert_allclose(
      core('longformer', window=3, global_tokens=0, block_size=4)(q, k, v, mask), local, **same)
  np.testing.assert_allclose(
      core('longformer', window=2, global_tokens=11, block_size=4)(q, k, v, mask), full, **same)
  np.testing.assert_allclose(
      core('bigbird', block_size=4, window_blocks=2, global_blocks=0, random_blocks=0)(
          q, k, v, mask), full, **same)


def test_bigbird_mask_is_deterministic_and_causal_rows_do_not_depend_on_length():
  kw = dict(window_blocks=1, global_blocks=1, random_blocks=2, seed=5)
  m = bigbird_block_mask(16, causal=False, **kw)
  np.testing.assert_array_equal(m, bigbird_block_mask.__wrapped__(16, causal=False, **kw))
  assert m[0].all()  # a global query block sees everything
  np.testing.assert_array_equal(m[2:15].sum(1), 3 + 1 + 2)  # window, global, random blocks
  assert not np.array_equal(m, bigbird_block_mask(16, causal=False, **{**kw, 'seed': 6}))
  short, long = (bigbird_block_mask(nb, causal=True, **kw) for nb in (6, 16))
  np.testing.assert_array_equal(long[:6, :6], short)
  assert not long[np.triu_indices(16, 1)].any()


@pytest.mark.parametrize('kind, options', [
    ('local', {}), ('dilated', {}), ('longformer', {}), ('bigbird', {}),
    ('sparse_transformer', {'pattern': 'strided'}), ('sparse_transformer', {'pattern': 'fixed'})])
def test_memory_is_sub_quadratic(kind, options):
  """No intermediate of forward + backward (default options) is n x n. The window / block kinds
  grow linearly in n; the Sparse Transformer's A2 has n / l (strided) or c n / l (fixed) keys
  per query, so there the bound is heads x n x (block keys + A2 keys), nothing more."""

  def largest(n):
    m = registry.build(AttentionConfig(kind=kind, options=options), num_heads=4, num_kv_heads=2,
                       head_dim=32, rngs=nnx.Rngs(0))
    q, kv = jnp.zeros((1, n, 4, 32)), jnp.zeros((1, n, 2, 32))
    loss = lambda q, k, v: jnp.sum(m(q, k, v, AttentionMask(causal=True)))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv)
    return max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)

  n = 4096
  big = largest(n)
  assert big < n * n / 2, big
  if kind == 'sparse_transformer':
    l, c, block = 128, 8, 64
    a2 = n // l if options['pattern'] == 'strided' else c * n // l
    assert big <= 4 * n * (block + 2 * l + 1 + a2), big
  else:
    assert big <= 2.1 * largest(n // 2), big


def layer(kind, opts, rngs):
  cfg = ModelConfig.from_dict({'d_model': 32, 'max_length': 12, 'position': {'kind': 'rope'},
                               'attention': {'kind': kind, 'num_heads': 4, 'num_kv_heads': 2,
                                             'options': opts}})
  return Attention(cfg, causal=True, rngs=rngs)


@pytest.mark.parametrize('case', ['dilated', 'longformer', 'bigbird', 'strided'])
def test_kv_cache_equals_full_with_narrow_patterns(case):
  """Unlike the generic test's example options, these patterns skip some earlier tokens."""
  m = layer(KIND.get(case, case), CASES[case], nnx.Rngs(0))
  call = nnx.jit(lambda m, x, cache: m(x, AttentionMask(), cache=cache))
  x = jax.random.normal(jax.random.key(0), (2, 12, 32))
  full, _ = call(m, x, None)
  cache = m.init_cache(2, 12)
  y, cache = call(m, x[:, :5], cache)
  outs = [y]
  for i in range(5, 12):
    y, cache = call(m, x[:, i:i + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_dropout():
  cfg = AttentionConfig(kind='local', dropout=0.5, options={'window': 3, 'block_size': 4})
  m = registry.build(cfg, num_heads=4, num_kv_heads=2, head_dim=H, rngs=nnx.Rngs(0))
  q, k, v = qkv(2, 11)
  mask = AttentionMask(causal=True)
  plain = core('local', window=3, block_size=4)(q, k, v, mask)
  np.testing.assert_allclose(m(q, k, v, mask), plain, atol=1e-6)
  dropped = m(q, k, v, mask, deterministic=False, dropout_rng=jax.random.key(1))
  assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, plain, atol=1e-3)
  with pytest.raises(ValueError, match='dropout_rng'):
    m(q, k, v, mask, deterministic=False)


@pytest.mark.parametrize('kind, options, field', [
    ('local', {'block_size': 0}, 'block_size'),
    ('local', {'window': -1}, 'window'),
    ('dilated', {'dilation': (1, 0)}, 'dilation'),
    ('longformer', {'global_tokens': 1.5}, 'global_tokens'),
    ('bigbird', {'random_blocks': -1}, 'random_blocks'),
    ('sparse_transformer', {'pattern': 'banded'}, 'pattern'),
    ('sparse_transformer', {'pattern': 'fixed', 'stride': 4, 'summary': 5}, 'summary'),
    ('local', {'windw': 3}, 'windw'),
])
def test_invalid_options(kind, options, field):
  with pytest.raises(ConfigError, match=field):
    core(kind, **options)


@pytest.mark.parametrize('feature', ['bias', 'cross'])
def test_refused_features(feature):
  with pytest.raises(ConfigError, match=feature):
    registry.require(AttentionConfig(kind='bigbird'), {feature})
