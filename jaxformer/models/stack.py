"""A stack of Transformer layers: scanned over depth, rematerialised by policy (CATALOG F5).

Layers are created once with `nnx.vmap`, so every parameter has a leading 'layers' axis, and the
forward pass runs them with `nnx.scan`: compile time does not grow with depth. With
`model.scan_layers=False` the same stacked parameters are run by a Python loop (useful for
debugging and for the scan == unrolled property), so checkpoints do not depend on the choice.

When MoE replaces the FFN in every `moe.every`-th layer, or a hybrid Mamba stack has attention in
every `mamba.attention_every`-th layer, the scanned unit is a group of layers (the least common
multiple of the two periods) in which each block is what its layer index says, so the scanned
body stays homogeneous.

How the layers are run is a strategy (`LayerLoop`, chosen by `layer_loop(cfg, cache)` from the
registry `LAYER_LOOPS`): every strategy runs one body `(x, layer, cache, side) -> (x, cache,
aux)` over the stacked layer groups (`side`: the mask, the stack's position bias, the encoder
output and its mask, token ids) and returns the final x, the stacked new caches and the aux
losses. `scan` (`model.scan_layers=True`, the default) runs it under `nnx.scan`; `unrolled`
(`scan_layers=False`) in a Python loop; `reversible` (`model.reversible`) runs the same layers as
reversible residual layers (models/reversible.py), which split each layer into its attention and
FFN branches instead of calling the body; `pipeline` (when the active layout carries a
`PipelineSpec`: a 'stage' mesh axis, jaxformer/parallel/pipeline.py) cuts the scanned groups
into stages and runs micro-batches through them, each stage scanning its groups. `model.remat`
wraps the body before any strategy sees it.

Position information that is a bias over (query, key) positions (ALiBi, T5 buckets: the position
kind's `stack_params` / `stack_bias` hooks) is computed once per stack and shared by all layers,
as in T5 and ALiBi; a core that evaluates it block by block (ring attention) gets the
`RelativeBias` function instead of the dense array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import AttentionMask, registry
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers import position_registry
from jaxformer.layers import positions as pos_lib
from jaxformer.layers.base import tag_params
from jaxformer.models import reversible
from jaxformer.models.block import MambaBlock, layer_mixer, zero_aux
from jaxformer.parallel import pipeline as pipeline_lib
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import active_layout, constrain, names_of

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


def layer_period(cfg: ModelConfig) -> int:
  """Layers per scanned group: the period of the MoE layers and of a hybrid's attention layers."""
  moe = cfg.moe.every if cfg.moe.num_experts else 1
  attention = cfg.mamba.attention_every if cfg.family_spec.mixer == 'mamba' else 0
  return math.lcm(moe, attention or 1)


def _block(cfg: ModelConfig, i: int, *, causal: bool, cross: bool, rngs: nnx.Rngs):
  """Layer i of a group (and of every group: the period divides both patterns)."""
  m = cfg.moe
  moe = bool(m.num_experts) and i % m.every == m.every - 1
  if layer_mixer(cfg, i) == 'mamba':
    return MambaBlock(cfg, moe=moe, rngs=rngs)
  block = cfg.family_spec.block_class()  # TransformerBlock unless the family has its own
  return block(cfg, causal=causal, cross=cross, moe=moe, rngs=rngs)


class LayerGroup(nnx.Module):
  """`period` consecutive layers; MoE and Mamba layers where their patterns put them."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs):
    p = layer_period(cfg)
    # Block i of the group in slice s of the 'layers' axis is layer s * p + i; the metadata
    # tells the optimizer so (layer-wise LR decay), whatever the path or the slicing.
    self.blocks = nnx.List([
        tag_params(_block(cfg, i, causal=causal, cross=cross, rngs=rngs), layer=i,
                   layers_per_slice=p)
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


def _name_stacked_scalars(layers: nnx.Module) -> nnx.Module:
  """nnx.vmap adds 'layers' to the axis names of every parameter except one with no names (flax
  skips empty names), so a scalar per layer (ScaleNorm's g) would come out [G] named (): its
  names would not match its shape. Names it ('layers',)."""
  for _, value in nnx.iter_graph(layers):
    if isinstance(value, nnx.Param) and value.get_metadata().get('out_sharding') == ():
      value.set_metadata(out_sharding=('layers',))
  return layers


class Stack(nnx.Module):
  """`num_layers` Transformer layers plus the stack-level position bias."""

  def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool = False,
               rngs: nnx.Rngs):
    p = layer_period(cfg)
    if num_layers % p:
      if cfg.moe.num_experts and num_layers % cfg.moe.every:
        field, value = 'model.moe.every', cfg.moe.every
      else:
        field, value = 'model.mamba.attention_every', cfg.mamba.attention_every
      raise ConfigError(f'{field}={value} is invalid: the scanned layer group ({p} layers, '
                        f'the MoE and attention periods) must divide the number of layers '
                        f'({num_layers})')
    self.cfg = cfg
    self.causal = causal
    self.num_groups = num_layers // p

    @nnx.split_rngs(splits=self.num_groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def create(rngs):
      return LayerGroup(cfg, causal=causal, cross=cross, rngs=rngs)

    self.layers = _name_stacked_scalars(create(rngs))
    self.position = position_registry.of(cfg)
    self.position_bias = self.position.stack_params(causal=causal, rngs=rngs)  # T5's table

  # ------------------------------------------------------------------ position bias
  def bias(self, q_pos, kv_pos):
    """Additive bias [1|B, N, T, S] shared by all layers, or None. For an attention core that
    evaluates a relative bias block by block (`takes_relative_bias`: ring attention), the
    `RelativeBias` itself, which the core calls with each block's positions."""
    relative = self.position.stack_bias(self.position_bias)
    if relative is None:
      return None
    a = self.cfg.attention
    if getattr(registry.lookup(a.kind, a.impl), 'takes_relative_bias', False):
      return relative
    return relative(q_pos, kv_pos)

  # ------------------------------------------------------------------ caches
  def _first_group(self) -> LayerGroup:
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Every layer's decoding cache (a self-attention KV cache under 'self' and whatever else
    the block keeps, such as the Conformer's convolution window; a Mamba state), stacked on a
    leading group axis."""
    dtype = dtype or self.cfg.compute_dtype
    group = self._first_group()
    one = [b.init_cache(batch, max_len, dtype) for b in group.blocks]
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
    kv_cache = None if cache is None else next(
        (c['self'] for c in cache if 'positions' in c.get('self', {})), None)
    if kv_cache is not None:
      # Key positions of the cache slots for a stack-level bias (a stateful core's cache
      # has none: such kinds take no bias; nor does a Mamba layer's).
      c0 = jax.tree.map(lambda a: a[0], kv_cache)
      kv_pos = jax.lax.dynamic_update_slice(
          c0['positions'], jnp.broadcast_to(q_pos, (c0['positions'].shape[0], t)).astype(
              c0['positions'].dtype), (0, c0['index']))
    else:
      kv_pos = mask.kv_positions if mask.kv_positions is not None else q_pos
    side = dict(mask=mask, bias=self.bias(q_pos, kv_pos), enc=enc, enc_mask=enc_mask,
                token_ids=token_ids)

    def body(x, layer, c, side):
      return layer(x, side['mask'], c, bias=side['bias'], enc=side['enc'],
                   enc_mask=side['enc_mask'], token_ids=side['token_ids'],
                   deterministic=deterministic)

    policy = self.cfg.remat
    if policy != 'none':
      body = nnx.remat(body, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.scan_layers)
    x, new_cache, aux = layer_loop(self.cfg, cache).run(self, body, x, cache, side,
                                                        deterministic=deterministic)
    aux = {k: jnp.sum(v) for k, v in aux.items()} or zero_aux(self.cfg)
    return x, new_cache, aux


# ---------------------------------------------------------------------- layer loops
class LayerLoop:
  """How a `Stack` runs its layer groups.

  `run(stack, body, x, cache, side, *, deterministic) -> (x, new_cache, aux)`: `body(x, layer,
  cache_i, side) -> (x, cache_i, aux_i)` is one layer group's forward (remat already applied);
  `side` holds what every layer reads besides x (the mask, the stack's position bias, the
  encoder output and its mask, token ids); `stack.layers` holds the groups stacked on a leading
  axis and `cache` the matching stacked caches (or None). `aux` maps each aux loss to its
  per-group values [num_groups] (or to their sum, or is {}).
  """
  name = ''

  def run(self, stack: Stack, body, x, cache, side, *, deterministic):
    raise NotImplementedError


LAYER_LOOPS: dict[str, LayerLoop] = {}


def register_loop(loop: type[LayerLoop]) -> type[LayerLoop]:
  LAYER_LOOPS[loop.name] = loop()
  return loop


def layer_loop(cfg: ModelConfig, cache=None) -> LayerLoop:
  """The strategy the config (and the active layout) asks for: reversible, else a pipeline
  over stages when the layout has one and there is no decoding cache, else scanned, else
  unrolled."""
  if cfg.reversible:
    return LAYER_LOOPS['reversible']
  layout = active_layout()
  if cfg.scan_layers and cache is None and layout is not None and layout.pipeline is not None:
    return LAYER_LOOPS['pipeline']
  return LAYER_LOOPS['scan' if cfg.scan_layers else 'unrolled']


@register_loop
class ScanLoop(LayerLoop):
  """`nnx.scan` over the groups: one traced body, so compile time does not grow with depth."""
  name = 'scan'

  def run(self, stack, body, x, cache, side, **_):
    return scan_groups(body, stack.layers, x, cache, side,
                       unroll=min(stack.cfg.scan_unroll, stack.num_groups))


def scan_groups(body, layers, x, cache, side, unroll: int = 1):
  scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, None), out_axes=(nnx.Carry, 0, 0),
                  unroll=unroll, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  return scan(x, layers, cache, side)


@register_loop
class UnrolledLoop(LayerLoop):
  """A Python loop over the groups, each sliced out of the stacked parameters and written back."""
  name = 'unrolled'

  def run(self, stack, body, x, cache, side, **_):
    graphdef, state = nnx.split(stack.layers)
    states, caches, auxes = [], [], []
    for i in range(stack.num_groups):
      layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
      c = None if cache is None else jax.tree.map(lambda a: a[i], cache)
      x, c, aux = body(x, layer, c, side)
      states.append(nnx.state(layer))
      caches.append(c)
      auxes.append(aux)
    nnx.update(stack.layers, jax.tree.map(lambda *a: jnp.stack(a), *states))
    stack_of = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
    return x, (None if cache is None else stack_of(caches)), stack_of(auxes)


@register_loop
class ReversibleLoop(LayerLoop):
  """Reversible residual layers (models/reversible.py): runs the attention and FFN branches of
  each layer itself, so it does not call `body`; dense layers only, hence no aux losses."""
  name = 'reversible'

  def run(self, stack, body, x, cache, side, *, deterministic):
    del body  # the branches are called separately; remat has nothing to add (see reversible)
    x, new_cache = reversible.reversible_stack(
        stack.layers, x, side['mask'], bias=side['bias'], cache=cache,
        deterministic=deterministic, scan=stack.cfg.scan_layers)
    return x, new_cache, {}


@register_loop
class PipelineLoop(LayerLoop):
  """The layer groups cut into stages and run as a pipeline over micro-batches
  (jaxformer/parallel/pipeline.py), with the active layout's `PipelineSpec`.

  Each stage runs its chunk of groups with `scan_groups` on one micro-batch at a time; side
  inputs with a batch dimension are cut into micro-batches with x (the others are shared), and
  each micro-batch's index is folded into the layers' dropout keys, so that the micro-batches
  draw different masks. Aux losses are summed over layers and averaged over micro-batches, as
  gradient accumulation averages the micro-batches' losses.
  """
  name = 'pipeline'

  def run(self, stack, body, x, cache, side, *, deterministic):
    del cache, deterministic  # only chosen without a cache; dropout is in the layers' keys
    layout = active_layout()
    spec = layout.pipeline
    b = x.shape[0]
    m_ = spec.microbatches
    if b % m_:
      raise ValueError(f'a batch of {b} rows does not split into the {m_} pipeline '
                       'micro-batches (optim.grad_accum_steps)')
    micro = lambda a: a.reshape((m_, b // m_) + a.shape[1:])  # noqa: E731
    # A RelativeBias holds parameters (no batch dimension) and is shared by every micro-batch.
    is_shared = lambda a: isinstance(a, pos_lib.RelativeBias)  # noqa: E731
    leaves, treedef = jax.tree.flatten(side, is_leaf=is_shared)
    split = [not is_shared(a) and a.ndim > 0 and a.shape[0] == b and b > 1 for a in leaves]
    per_micro = [micro(a) for a, s in zip(leaves, split) if s]
    shared = [a for a, s in zip(leaves, split) if not s]

    def side_of(sd):
      it_split, it_shared = iter(sd), iter(shared)
      return jax.tree.unflatten(treedef, [next(it_split) if s else next(it_shared)
                                          for s in split])

    graphdef, state = nnx.split(stack.layers)
    weights = _stage_weights(state, spec)

    def stage_fn(w, xs, sd, m):
      layers = nnx.merge(graphdef, _fold_dropout(w, m))
      y, _, aux = scan_groups(body, layers, xs, None, side_of(sd))
      return y, jax.tree.map(jnp.sum, aux)

    stage_axis = 'stage' if layout.sizes.get('stage', 1) > 1 else None
    names = (R.STAGE,) + R.RESIDUAL
    out, aux, _ = pipeline_lib.run(
        stage_fn, weights, micro(x), per_micro, spec, stage_axis=stage_axis,
        constrain_state=lambda a: constrain(a, names))
    return out.reshape(x.shape), None, {k: v / m_ for k, v in aux.items()}


def _stage_weights(state, spec):
  """The stacked groups' variables as [S, R, groups per chunk, ...], sharded by stage."""
  is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731

  def reshape(v):
    if not is_var(v):
      return pipeline_lib.to_stages(v, spec)
    a = pipeline_lib.to_stages(v.get_value(), spec)
    names = names_of(v)
    if names is not None:
      a = constrain(a, (names[0], None, None) + tuple(names[1:]))
    return v.replace(a)

  return jax.tree.map(reshape, state, is_leaf=is_var)


def _fold_dropout(state, m):
  """Layer variables with micro-batch `m` folded into every dropout stream's keys."""
  is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731

  def fold(v):
    if isinstance(v, nnx.RngKey) and v.tag == 'dropout':
      keys = v.get_value()
      return v.replace(jax.vmap(jax.random.fold_in, (0, None))(keys, m) if keys.ndim
                       else jax.random.fold_in(keys, m))
    return v

  return jax.tree.map(fold, state, is_leaf=is_var)
