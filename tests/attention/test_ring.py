"""Context parallelism (catalog A9): ring attention and all-gathered K/V over the 'context' axis.

Oracle: the reference core (`core.dot_product_attention`, impl 'xla') on the whole sequence;
values and gradients of q, k, v (and of ALiBi / T5 position biases) agree to 1e-5 in float32 on
meshes of the 8 simulated devices.
The block schedule is checked by counting: zig-zag order gives every device the same number of
causal blocks, and a sliding window skips blocks (and ring steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import AttentionMask, registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.config import AttentionConfig, ConfigError
from jaxformer.layers import positions as pos_lib
from jaxformer.parallel import ring
from jaxformer.parallel.config import ParallelConfig
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout

MESHES = {'cp8': {'context': 8, 'data': 1}, 'cp4_dp2': {'context': 4, 'data': 2}}
B, T, N, K, H = 2, 32, 4, 2, 8  # GQA: two query heads per kv head


def layout(mesh):
  cfg = ParallelConfig(preset='dp', mesh=mesh)
  cfg.validate()
  return Layout(make_mesh(cfg), cfg.logical_rules())


def qkv(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
          jax.random.normal(ks[2], (B, T, K, H)))


def packed_mask(causal, window=None):
  """Row 0: three packed segments with positions reset per segment; row 1: right padding."""
  seg = np.ones((B, T), np.int32)
  seg[0, 11:20], seg[0, 20:] = 2, 3
  seg[1, 27:] = 0
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  pos[0, 11:20] -= 11
  pos[0, 20:] -= 20
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  return AttentionMask(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                       causal=causal, window=window)


def core(impl):
  # Key tiles of 2 tokens: on cp4 x dp2 (chunks of 4 tokens) each block runs two inner tiles.
  options = {'block_k': 2} if impl == 'ring' else {}
  cfg = AttentionConfig(kind='dot_product', impl=impl, num_heads=N, num_kv_heads=K, head_dim=H,
                        options=options)
  return registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=None,
                        needed={'causal', 'padding', 'segments'})


def value_and_grads(attend, q, k, v):
  """The output and the gradients of a fixed random projection of it w.r.t. q, k, v."""
  w = jax.random.normal(jax.random.key(7), (B, T, N, H))
  loss = lambda q, k, v: jnp.sum(attend(q, k, v) * w)  # noqa: E731
  return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def check_against_reference(impl, mesh, mask):
  q, k, v = qkv()
  want = jax.jit(lambda q, k, v: value_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v))(q, k, v)
  lay, c = layout(mesh), core(impl)
  got = jax.jit(lay.wrap(lambda q, k, v: value_and_grads(
      lambda q, k, v: c(q, k, v, mask), q, k, v)))(q, k, v)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), (got[0], *got[1]), (want[0], *want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------- the schedule
@pytest.mark.parametrize('size', [2, 4, 8])
def test_zigzag_balances_causal_blocks(size):
  zig = ring.schedule(size, 2 * size * 4, causal=True)
  counts = zig.blocks_per_device()
  assert np.all(counts == counts[0]), counts
  assert counts[0] == 3 + 2 * (size - 1)  # the diagonal step: 3 of 4 blocks; then 2 of 4
  # Not vacuous: contiguous order gives device d work that grows with d.
  flat = ring.schedule(size, 2 * size * 4, causal=True, zigzag=False).blocks_per_device()
  assert list(flat) == sorted(flat) and flat[0] < flat[-1]
  assert flat.sum() == counts.sum()  # the same blocks, only dealt differently


def test_schedule_blocks_match_the_dense_mask():
  """A block is scheduled exactly when the dense causal/window mask has a True in it."""
  size, chunk = 4, 3
  length = 2 * size * chunk
  for causal, window in [(True, None), (False, None), (True, 4), (False, 7), (True, 1)]:
    sched = ring.schedule(size, length, causal=causal, window=window)
    dense = np.asarray(AttentionMask(causal=causal, window=window).dense(length, length)
                       if causal or window else jnp.ones((1, 1, length, length), bool))[0, 0]
    ids = ring.chunk_ids(size, sched.zigzag)
    for d in range(size):
      for r in range(size):
        for a in range(2):
          for b in range(2):
            i, j = ids[d, a], ids[(d - r) % size, b]
            any_visible = dense[i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk].any()
            scheduled = r < sched.steps and sched.visible[d, r, a, b]
            assert scheduled == any_visible, (causal, window, d, r, a, b)


def test_window_skips_blocks_and_steps():
  size, length = 8, 64  # chunks of 4 tokens
  full = ring.schedule(size, length, causal=False)
  band = ring.schedule(size, length, causal=False, window=5)
  assert full.blocks_per_device().sum() == 4 * size * size
  # |t - s| < 5 reaches the neighbouring chunk on each side and no further.
  assert band.blocks_per_device().sum() == 2 * size + 2 * (2 * size - 1)  # of 16 x 16
  # Causal: the band reaches one chunk back, so contiguous order needs two ring steps of eight.
  causal_band = ring.schedule(size, length, causal=True, window=5)
  assert not causal_band.zigzag and causal_band.steps == 2
  assert causal_band.blocks_per_device().sum() == 2 * size + 2 * size - 1
  assert ring.schedule(size, length, causal=True).zigzag


def test_zigzag_relayout_round_trips():
  lay = layout(MESHES['cp4_dp2'])
  x = jnp.arange(B * T, dtype=jnp.float32).reshape(B, T)
  spec = jax.sharding.PartitionSpec('data', 'context')

  def f(x):
    z = ring.to_zigzag(x, 'context', 4)
    return z, ring.from_zigzag(z, 'context', 4)

  z, back = jax.jit(jax.shard_map(f, mesh=lay.mesh, in_specs=spec, out_specs=(spec, spec)))(x)
  chunk = T // 8
  order = np.concatenate([np.arange(c * chunk, (c + 1) * chunk)
                          for c in ring.chunk_ids(4, True).reshape(-1)])
  np.testing.assert_array_equal(np.asarray(z), np.asarray(x)[:, order])
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


# ---------------------------------------------------------------- parity with the reference
@pytest.mark.parametrize('mesh, causal', [
    ('cp8', True), ('cp4_dp2', True), ('cp4_dp2', False),
    pytest.param('cp8', False, marks=pytest.mark.slow)])
def test_ring_equals_reference(mesh, causal):
  check_against_reference('ring', MESHES[mesh], packed_mask(causal))


@pytest.mark.parametrize('causal', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_ring_window_equals_reference(causal):
  check_against_reference('ring', MESHES['cp8'], packed_mask(causal, window=5))


def test_ring_softcap_equals_reference():
  q, k, v = qkv(1)
  mask = packed_mask(True)
  cfg = AttentionConfig(kind='dot_product', impl='ring', num_heads=N, num_kv_heads=K,
                        head_dim=H, logit_softcap=2.0)
  c = registry.build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, rngs=None)
  want = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, mask, logit_softcap=2.0),
                         q, k, v)
  got = jax.jit(layout(MESHES['cp4_dp2']).wrap(
      lambda q, k, v: value_and_grads(lambda q, k, v: c(q, k, v, mask), q, k, v)))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mesh', ['cp4_dp2'])
def test_allgather_equals_reference(mesh):
  check_against_reference('context_allgather', MESHES[mesh], packed_mask(True))


@pytest.mark.slow
@pytest.mark.parametrize('causal', [True, False])
def test_allgather_window_equals_reference_cp8(causal):
  check_against_reference('context_allgather', MESHES['cp8'], packed_mask(causal, window=5))


# ---------------------------------------------------------------- position biases
def relative_bias(kind, causal):
  if kind == 'alibi':
    return pos_lib.alibi(N)
  return pos_lib.RelativeBias(table=jax.random.normal(jax.random.key(3), (8, N)), num_buckets=8,
                              max_distance=16, bidirectional=not causal)


BIAS_CASES = [('ring', 'cp8', 'alibi', True), ('ring', 'cp4_dp2', 't5', False),
              ('context_allgather', 'cp8', 't5', True)]
BIAS_SLOW = [(i, m, kd, c) for i in ('ring', 'context_allgather') for m in MESHES
             for kd in ('alibi', 't5') for c in (True, False) if (i, m, kd, c) not in BIAS_CASES]


@pytest.mark.parametrize('impl,mesh,kind,causal', BIAS_CASES + [
    pytest.param(*c, marks=pytest.mark.slow) for c in BIAS_SLOW])
def test_position_bias_equals_reference(impl, mesh, kind, causal):
  """ALiBi and T5 biases evaluated per block at global positions (packed rows with positions
  reset per segment): output, the gradients of q, k, v and of the bias (T5's table, ALiBi's
  slopes) equal the reference core with the dense bias."""
  mask = packed_mask(causal)
  q, k, v = qkv()
  bias = relative_bias(kind, causal)
  w = jax.random.normal(jax.random.key(7), (B, T, N, H))

  def reference(q, k, v, b):
    qp, kp = mask.positions(T, T)
    out = dot_product_attention(q, k, v, mask, bias=b(qp, kp))
    return jnp.sum(out * w), out

  lay, c = layout(MESHES[mesh]), core(impl)

  def context(q, k, v, b):
    out = c(q, k, v, mask, bias=b)
    return jnp.sum(out * w), out

  grads = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)  # noqa: E731
  (_, want_out), want = jax.jit(grads(reference))(q, k, v, bias)
  (_, got_out), got = jax.jit(lay.wrap(grads(context)))(q, k, v, bias)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for name, g, wnt in zip(('dq', 'dk', 'dv', 'dbias'), got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(wnt)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5,
                                 err_msg=name)
  assert np.abs(np.asarray(jax.tree.leaves(want[3])[0])).max() > 1e-2  # the bias matters


# ---------------------------------------------------------------- refusals
def test_length_not_divisible_is_refused():
  q, k, v = (x[:, :24] for x in qkv())  # 24 is not a multiple of 2 x 8
  with pytest.raises(ConfigError, match='divisible by 16'):
    jax.jit(layout(MESHES['cp8']).wrap(lambda q, k, v: core('ring')(q, k, v, None)))(q, k, v)


def test_a_dense_bias_is_refused():
  """Position biases come as a RelativeBias; a dense [T, S] array would travel the ring."""
  q, k, v = qkv()
  bias = jnp.zeros((1, N, T, T))
  with pytest.raises(ValueError, match='not a dense array'):
    jax.jit(layout(MESHES['cp8']).wrap(lambda q, k, v: core('ring')(q, k, v, None, bias=bias)))(
        q, k, v)


# ---------------------------------------------------------------- memory
def test_ring_memory_is_blockwise_also_inside_a_scan():
  """Compiled (not run) at L = 4096 on cp8: the gradient's temporaries stay far below the
  device's dense [N, L / 8, L] scores, and a scan over layers adds nothing. Without
  `ring._tie`, JAX hoisted each block's masks out of the scan and stacked them (28x)."""
  length, n, kh, h = 4096, 4, 2, 8
  lay = layout(MESHES['cp8'])
  cfg = AttentionConfig(kind='dot_product', impl='ring', num_heads=n, num_kv_heads=kh,
                        head_dim=h, options={'block_k': 64})
  c = registry.build(cfg, num_heads=n, num_kv_heads=kh, head_dim=h, rngs=None)
  mask = AttentionMask(causal=True)
  sharding = lay.sharding(('activation_batch', 'activation_length', None, None))
  arg = lambda heads: jax.ShapeDtypeStruct((1, length, heads, h), jnp.float32,  # noqa: E731
                                           sharding=sharding)

  def temporaries(scan):
    def attend(q, k, v):
      if scan:
        return jax.lax.scan(lambda x, _: (c(x, k, v, mask), None), q, None, length=1)[0]
      return c(q, k, v, mask)
    grads = lambda q, k, v: jax.grad(  # noqa: E731
        lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    compiled = jax.jit(lay.wrap(grads)).lower(arg(n), arg(kh), arg(kh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, scanned = temporaries(False), temporaries(True)
  dense = n * (length // 8) * length * 4
  assert plain < dense / 10, (plain, dense)
  assert scanned < 1.5 * plain, (scanned, plain)
