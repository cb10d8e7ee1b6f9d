"""Sharding-readiness (issue 2): parameters placed on 8 simulated devices using only their
logical names give the same forward pass as on one device."""

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.layers.base import logical_rules
from jaxformer.models import build_model, family
from jaxformer.parallel.sharding import make_mesh, param_specs, shard_params


def test_llama_forward_sharded_over_8_devices_equals_single_device():
  assert jax.device_count() == 8
  cfg = family('llama', vocab_size=64, d_model=64, num_layers=2, max_length=32,
               attention=dict(num_heads=8, num_kv_heads=8), ffn=dict(hidden_dim=128))
  model = build_model(cfg, seed=0)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  ref = model(toks).logits

  rules = (('embed', 'model'), ('mlp', 'model'))
  mesh = make_mesh((8,), ('model',))
  specs = jax.tree.leaves(param_specs(nnx.state(model, nnx.Param), rules),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert any('model' in tuple(s) for s in specs)
  shard_params(model, mesh, rules)
  w = model.stack.layers.blocks[0].ffn
  sharded = [v for v in jax.tree.leaves(nnx.state(w, nnx.Param)) if len(v.sharding.device_set) == 8]
  assert sharded, 'FFN weights were not distributed over the 8 devices'

  @nnx.jit
  def fwd(m, t):
    return m(t).logits

  with jax.set_mesh(mesh), logical_rules(rules):
    out = fwd(model, toks)
  chex.assert_trees_all_close(out, ref, atol=1e-5)
