"""A stack of Transformer layers: scanned over depth, rematerialised by policy (CATALOG F5).

Layers are created once with `nnx.vmap`, so every parameter has a leading 'layers' axis, and the
forward pass runs them with `nnx.scan`: compile time does not grow with depth. With
`model.scan_layers=False` the same stacked parameters are run by a Python loop (useful for
debugging and for the scan == unrolled property), so checkpoints do not depend on the choice.

When MoE replaces the FFN in every `moe.every`-th layer, the scanned unit is a group of `every`
layers (the last of which is MoE), so the scanned body stays homogeneous.

With `model.reversible` the same layers run as reversible residual layers (models/reversible.py).

Position information that is a bias over (query, key) positions (ALiBi, T5 buckets) is computed
once per stack and shared by all layers, as in T5 and ALiBi.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers import positions as pos_lib
from jaxformer.models import reversible
from jaxformer.models.block import TransformerBlock, zero_aux

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


def layer_period(cfg: ModelConfig) -> int:
  return cfg.moe.every if cfg.moe.num_experts else 1


class LayerGroup(nnx.Module):
  """`period` consecutive layers; the last one is MoE when MoE is enabled."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs):
    p = layer_period(cfg)
    self.blocks = nnx.List([
        TransformerBlock(cfg, causal=causal, cross=cross,
                         moe=bool(cfg.moe.num_experts) and i == p - 1, rngs=rngs)
        for i in range(p)])

  def __call__(self, x, mask, cache, *, bias, enc, enc_mask, token_ids, deterministic):
    new_caches, aux_total = [], {}
    for i, block in enumerate(self.blocks):
      x, c, aux = block(x, mask, bias=bias, enc=enc, enc_mask=enc_mask,
                        cache=None if cache is None else cache[i], token_ids=token_ids,
                        deterministic=deterministic)
      new_caches.append(c)
      for k, v in aux.items():
        aux_total[k] = aux_total.get(k, 0.0) + v
    return x, (None if cache is None else new_caches), aux_total


class Stack(nnx.Module):
  """`num_layers` Transformer layers plus the stack-level position bias."""

  def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool = False,
               rngs: nnx.Rngs):
    p = layer_period(cfg)
    if num_layers % p:
      raise ConfigError(f'model.moe.every={p} is invalid: it must divide the number of layers '
                        f'({num_layers})')
    self.cfg = cfg
    self.causal = causal
    self.num_groups = num_layers // p

    @nnx.split_rngs(splits=self.num_groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def create(rngs):
      return LayerGroup(cfg, causal=causal, cross=cross, rngs=rngs)

    self.layers = create(rngs)
    pc = cfg.position
    if pc.kind == 't5':
      self.position_bias = pos_lib.T5RelativeBias(
          pc.num_buckets, pc.max_distance, cfg.num_heads, bidirectional=not causal, rngs=rngs)
    else:
      self.position_bias = None

  # ------------------------------------------------------------------ position bias
  def bias(self, q_pos, kv_pos):
    """Additive bias [1|B, N, T, S] shared by all layers, or None."""
    kind = self.cfg.position.kind
    if kind == 't5':
      return self.position_bias(q_pos, kv_pos)
    if kind == 'alibi':
      return pos_lib.alibi_bias(q_pos, kv_pos, self.cfg.num_heads)
    return None

  # ------------------------------------------------------------------ caches
  def _first_group(self) -> LayerGroup:
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Self-attention KV cache for every layer, stacked on a leading group axis."""
    dtype = dtype or self.cfg.compute_dtype
    group = self._first_group()
    one = [{'self': b.self_attn.init_cache(batch, max_len, dtype)} for b in group.blocks]
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_groups,) + a.shape), one)

  def precompute_cross(self, cache, enc, enc_mask: AttentionMask):
    """Adds each layer's cross-attention K/V of the encoder output to `cache` (computed once)."""

    def body(layer, c):
      out = []
      for block, ci in zip(layer.blocks, c):
        ci = dict(ci)
        ci['cross'] = block.cross_attn.precompute_cross(enc, enc_mask.kv_segment_ids)
        out.append(ci)
      return out

    return nnx.scan(body, in_axes=(0, 0), out_axes=0,
                    transform_metadata={nnx.PARTITION_NAME: 'layers'})(self.layers, cache)

  # ------------------------------------------------------------------ forward
  def __call__(self, x, mask: AttentionMask, *, enc=None, enc_mask=None, cache=None,
               token_ids=None, deterministic: bool = True):
    """x [B, T, D] -> (y, new_cache, aux); aux sums MoE losses over layers."""
    t = x.shape[1]
    q_pos = mask.q_positions if mask.q_positions is not None else jnp.arange(t)[None]
    if cache is not None and 'positions' in cache[0]['self']:
      # Key positions of the cache slots for a stack-level bias (a stateful core's cache
      # has none: such kinds take no bias).
      c0 = jax.tree.map(lambda a: a[0], cache[0]['self'])
      kv_pos = jax.lax.dynamic_update_slice(
          c0['positions'], jnp.broadcast_to(q_pos, (c0['positions'].shape[0], t)).astype(
              c0['positions'].dtype), (0, c0['index']))
    else:
      kv_pos = mask.kv_positions if mask.kv_positions is not None else q_pos
    bias = self.bias(q_pos, kv_pos)
    if self.cfg.reversible:  # Reformer: two streams, inputs recomputed in the backward pass
      x, new_cache = reversible.reversible_stack(
          self.layers, x, mask, bias=bias, cache=cache, deterministic=deterministic,
          scan=self.cfg.scan_layers)
      return x, new_cache, zero_aux(self.cfg)
    kwargs = dict(bias=bias, enc=enc, enc_mask=enc_mask, token_ids=token_ids,
                  deterministic=deterministic)

    def body(x, layer, c):
      y, new_c, aux = layer(x, mask, c, **kwargs)
      return y, new_c, aux

    policy = self.cfg.remat
    if policy != 'none':
      body = nnx.remat(body, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.scan_layers)

    if self.cfg.scan_layers:
      scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0),
                      transform_metadata={nnx.PARTITION_NAME: 'layers'})
      x, new_cache, aux = scan(x, self.layers, cache)
    else:
      x, new_cache, aux = self._unrolled(body, x, cache)
    aux = {k: jnp.sum(v) for k, v in aux.items()} or zero_aux(self.cfg)
    return x, new_cache, aux

  def _unrolled(self, body, x, cache):
    graphdef, state = nnx.split(self.layers)
    states, caches, auxes = [], [], []
    for i in range(self.num_groups):
      layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
      c = None if cache is None else jax.tree.map(lambda a: a[i], cache)
      x, c, aux = body(x, layer, c)
      states.append(nnx.state(layer))
      caches.append(c)
      auxes.append(aux)
    nnx.update(self.layers, jax.tree.map(lambda *a: jnp.stack(a), *states))
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
    return x, (None if cache is None else stack(caches)), stack(auxes)
