"""Layouts, constraints, sharded state and custom kernels on 8 simulated devices (issue 10)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from parallel_helpers import LAYOUTS, LLAMA, experiment, lm_batches, one_device, program

from jaxformer.attention import Attention, AttentionMask, registry
from jaxformer.config import ModelConfig
from jaxformer.models import family
from jaxformer.parallel import hlo
from jaxformer.parallel import rules as R
from jaxformer.parallel import state as state_lib
from jaxformer.parallel.config import ParallelConfig
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout, constrain, embedding_lookup


def spec_of(x) -> P:
  """The PartitionSpec of an array, padded with None to its rank (P('a') == P('a', None))."""
  spec = tuple(x.sharding.spec)
  return P(*(spec + (None,) * (x.ndim - len(spec))))


def layout(devices=None, **parallel) -> Layout:
  cfg = ParallelConfig(**parallel)
  cfg.validate()
  return Layout(make_mesh(cfg, devices), cfg.logical_rules())


# ------------------------------------------------------------------ the layout belongs to the fn
def test_constraints_apply_only_inside_the_function_that_carries_the_layout():
  x = jnp.ones((8, 16, 32))
  f = lambda x: constrain(x * 2, R.RESIDUAL)  # noqa: E731
  assert f(x) is not None  # no layout: a no-op, not an error
  by_batch = layout(mesh={'data': 8})
  by_length = layout(mesh={'tensor': 8}, preset='tp', sequence_parallel=True)
  out_a = jax.jit(by_batch.wrap(f))(x)
  out_b = jax.jit(by_length.wrap(f))(x)
  assert spec_of(out_a) == P('data', None, None)
  assert spec_of(out_b) == P(None, 'tensor', None)
  # The same jitted function called inside another layout keeps the layout it was made with:
  # nothing global leaks into (or out of) the jit cache.
  jitted = jax.jit(by_batch.wrap(f))
  with by_length.active():
    assert spec_of(jitted(x)) == P('data', None, None)
  assert jax.jit(f)(x).sharding.is_fully_replicated


def test_sequence_parallelism_shards_the_residual_stream_over_length():
  cfg = family('llama', **LLAMA)
  from jaxformer.models.block import TransformerBlock
  block = TransformerBlock(cfg, causal=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 16, 64))
  mask = AttentionMask(causal=True)
  call = lambda b, x: b(x, mask)[0]  # noqa: E731
  for par, expected in [(LAYOUTS['fsdp4_tp2_sp'], P('fsdp', 'tensor', None)),
                        (dict(preset='fsdp_tp', mesh={'fsdp': 4, 'tensor': 2}),
                         P('fsdp', None, None))]:
    lay = layout(**par)
    out = nnx.jit(lay.wrap(call))(block, x)
    assert spec_of(out) == expected
    np.testing.assert_allclose(out, call(block, x), atol=1e-5)


# ------------------------------------------------------------------ vocab-parallel
def test_vocab_parallel_embedding_equals_a_lookup_with_its_gradient():
  lay = layout(mesh={'data': 2, 'fsdp': 2, 'tensor': 2})
  table = jax.random.normal(jax.random.key(0), (64, 32))
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 64).at[0, 0].set(64).at[1, 1].set(-3)
  w = jax.random.normal(jax.random.key(2), (8, 16, 32))

  def loss(table, ids):
    out = embedding_lookup(table, ids)
    return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * w), out

  (ref_loss, ref_out), ref_grad = jax.value_and_grad(loss, has_aux=True)(table, ids)
  table_s = jax.device_put(table, lay.sharding(('vocab', 'embed')))
  ids_s = jax.device_put(ids, lay.batch_sharding())
  fn = jax.jit(lay.wrap(jax.value_and_grad(loss, has_aux=True)))
  assert 'shard_map' in str(jax.make_jaxpr(lay.wrap(loss))(table_s, ids_s))
  (out_loss, out), grad = fn(table_s, ids_s)
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  assert np.isnan(out[0, 0]).all() and np.isnan(out[1, 1]).all()  # never a clipped lookup
  np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def test_tensor_parallel_step_never_gathers_the_logits():
  """Embedding, logits and cross entropy stay split over the vocabulary (V = 128 here, so any
  [.., 16, 128] buffer in a collective would be logits)."""
  model = dict(LLAMA, vocab_size=128)
  prog = program(experiment('llama', model, parallel=LAYOUTS['tp8']))
  text = prog.train_step.lower(prog.target(), prog.abstract_batch(
      lm_batches(1, vocab=128)[0])).compile().as_text()
  logits_shaped = [line.strip()[:160] for line in text.splitlines()
                   if re.search(r'(all-gather|all-reduce|all-to-all)(-start)?\(', line)
                   and re.search(r'\[\d+,16,128\]', line.split('(')[0])]
  assert not logits_shaped, logits_shaped
  ops = hlo.summarize(hlo.collectives(text, 8))
  assert ops['all-reduce']['count'] > 0  # the row-parallel projections do reduce


# ------------------------------------------------------------------ sharded state
def test_fsdp8_keeps_an_eighth_of_parameters_and_optimizer_state_per_device():
  prog = program(experiment('llama', LLAMA, parallel=LAYOUTS['fsdp8']))
  state = prog.init_state()
  per_device = {}
  total = 0
  for leaf in jax.tree.leaves({'p': state['params'], 'o': state['opt_state']}):
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  assert len(per_device) == 8
  assert max(per_device.values()) <= total / 8 * 1.05, (max(per_device.values()), total)
  # The same figure from shardings alone (what the plan command reports).
  computed = sum(state_lib.bytes_per_device(state[k], prog.state_shardings[k])
                 for k in ('params', 'opt_state'))
  assert computed == max(per_device.values())


def test_sharded_initialisation_never_materialises_a_whole_parameter():
  """The largest matrix (the [512, 64] embedding) exists only as [512, 8] shards: the compiled
  initialiser contains no value of its full shape on any device."""
  model = dict(LLAMA, vocab_size=512)
  prog = program(experiment('llama', model, parallel=LAYOUTS['fsdp8']))
  emb = prog.abstract_state['params']['embedder']['embed']['embedding']
  assert emb.get_value().shape == (512, 64)
  from jaxformer.parallel.state import _build
  lowered = jax.jit(lambda: nnx.split(_build(prog.exp.model, 0))[1],
                    out_shardings=prog.layout.state_shardings(
                        nnx.split(state_lib.abstract_model(prog.exp.model))[1])).lower()
  text = lowered.compile().as_text()
  assert 'f32[512,8]' in text
  assert not re.search(r'\[512,64\]', text)
  assert not re.search(r'\[64,512\]', text)
  state = prog.init_state()
  table = state['params']['embedder']['embed']['embedding'].get_value()
  assert {s.data.shape for s in table.addressable_shards} == {(512, 8)}
  # And the values are those of a one-device initialisation.
  ref = program(experiment('llama', model, parallel=dict(mesh={'data': 1})),
                one_device()).init_state()
  np.testing.assert_array_equal(table, ref['params']['embedder']['embed']['embedding'].get_value())


# ------------------------------------------------------------------ custom kernels
@pytest.mark.parametrize('impl', ['pallas', 'cudnn'])
def test_fused_attention_under_a_mesh_equals_one_device(impl):
  """XLA cannot partition a Pallas / cuDNN call: it runs under shard_map over batch and heads
  (interpret mode on CPU; cudnn's mask translation on XLA's implementation)."""
  cls = registry.lookup('dot_product', impl)
  cfg = ModelConfig.from_dict({
      'd_model': 32, 'max_length': 32, 'position': {'kind': 'alibi'},
      'attention': {'kind': 'dot_product', 'impl': impl, 'num_heads': 4, 'num_kv_heads': 2,
                    'options': dict(cls.example_options)}})
  attn = Attention(cfg, causal=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 32, 32))
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 8 + [0] * 4], 8, axis=0), jnp.int32)
  mask = AttentionMask.build(q_len=32, segment_ids=seg, causal=True)
  from jaxformer.layers.positions import alibi_bias
  bias = alibi_bias(jnp.arange(32)[None], jnp.arange(32)[None], 4)

  def loss(m, x):
    y = m(x, mask, bias=bias)[0]
    return jnp.sum(y ** 2), y

  (ref_loss, ref), ref_grad = nnx.value_and_grad(loss, has_aux=True)(attn, x)
  lay = layout(mesh={'data': 4, 'tensor': 2}, preset='tp')
  xs = jax.device_put(x, lay.batch_sharding())
  assert 'shard_map' in str(jax.make_jaxpr(lay.wrap(lambda x: loss(attn, x)))(xs))
  (out_loss, out), grad = nnx.jit(lay.wrap(nnx.value_and_grad(loss, has_aux=True)))(attn, xs)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
  chex.assert_trees_all_close(nnx.state(grad), nnx.state(ref_grad), atol=1e-4)
