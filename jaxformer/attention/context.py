"""Context parallelism: the 'dot_product' kind with impl 'ring' and 'context_allgather' (A9).

Both compute the reference core's function (`core.dot_product_attention`) with the sequence
split over the 'context' mesh axis of the active layout (`parallel.mesh.context` = C). The
layer around the core is written for the whole sequence, so its positions (RoPE, the mask's
positions) are global; the core runs in `jax.shard_map` over the context axis (and over the
batch and head axes, as `shard_kernel` does), where each device holds L / C tokens of q, k, v,
segment ids and positions.

  * 'ring': ring attention (`jaxformer.parallel.ring`): K/V blocks travel around the ring with
    `ppermute`, an online softmax merges them, and the backward pass is a ring too. A device
    holds its shard, the K/V block in flight and one key tile of scores [B, N, L / 2C, block_k]
    (option `block_k`, default 512). Causal masks use zig-zag order (device d holds chunks d
    and 2C-1-d of 2C), so the layer moves its shards into that order and back (two ppermutes of
    half a shard per array); sliding windows skip the blocks outside the band. L must be a
    multiple of 2C.
  * 'context_allgather': each device all-gathers K/V (and their segment ids and positions)
    over the context axis and attends with its local queries (the backward pass reduce-scatters
    dK, dV) through the reference core. Simple, but holds the full K/V and the dense
    [B, N, L / C, L] scores. L must be a multiple of C.

Without a context axis (no layout, or C = 1) 'ring' runs the same blockwise code with no ring
(one device, two chunks) when L is even, and the reference core otherwise; 'context_allgather'
is the reference core.

Position biases (ALiBi, T5) arrive as a `layers.positions.RelativeBias`, a function of the
global positions (`takes_relative_bias`): 'ring' evaluates it tile by tile with each tile's
positions, and its backward pass sums T5's table gradient over the blocks of every device;
'context_allgather' evaluates it for its queries against the gathered key positions.

Not supported: a dense additive bias (a [T, S] array would have to travel with K/V and is as
large as what the ring avoids), dropout, attention weights, Shaw's value term, decoding caches
and cross-attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError
from jaxformer.layers.positions import RelativeBias
from jaxformer.parallel import rules as R
from jaxformer.parallel import ring
from jaxformer.parallel.sharding import active_layout

P = jax.sharding.PartitionSpec
CONTEXT = 'context'

_NO_BIAS = ('a dense [T, S] bias would travel around the ring with K/V, as large as what '
            'context parallelism avoids; position biases (ALiBi, T5) are evaluated per block '
            'from their positions instead')
_COMMON = {
    'dropout': 'the blockwise softmax draws no dropout pattern that could reproduce the '
               "reference core's",
    'weights': 'no device ever holds the [T, S] probabilities',
    'shaw': "Shaw's value term needs the full probability matrix [B, N, T, S]",
    'decode': 'context parallelism splits long training sequences; decode with impl xla',
    'cross': 'the ring exchanges the keys of the same sequence (self-attention only)',
}


def _local_mask_arrays(q, mask: AttentionMask):
  """Segment ids and positions of queries and keys as [B, T] int32 arrays."""
  if mask.extra is not None:
    raise ValueError('context parallel attention takes masks as segment ids, positions, causal '
                     "and window only; AttentionMask.extra (a dense mask) needs impl 'xla'")
  b, t = q.shape[:2]
  qp, kp = mask.positions(t, t)
  ones = jnp.ones((b, t), jnp.int32)
  full = lambda x: jnp.broadcast_to(x, (b, t)).astype(jnp.int32)  # noqa: E731
  qs = ones if mask.q_segment_ids is None else full(mask.q_segment_ids)
  ks = ones if mask.kv_segment_ids is None else full(mask.kv_segment_ids)
  return qs, ks, full(qp), full(kp)


def _specs(layout, q, k):
  """PartitionSpecs of q / k ([B, T, N|K, H]) and of [B, T] arrays inside the shard_map."""
  sizes = layout.sizes

  def used(axes, n):
    axes = tuple(a for a in axes if sizes[a] > 1)
    return axes if axes and n % math.prod(sizes[a] for a in axes) == 0 else ()

  batch = used(layout.rules.axes(R.BATCH), q.shape[0])
  heads = layout.rules.axes(R.HEADS)
  if heads != layout.rules.axes(R.KV_HEADS):
    heads = ()
  heads = used(heads, q.shape[2]) if used(heads, k.shape[2]) else ()
  if CONTEXT in batch + heads:
    raise ConfigError("parallel.rules map the batch or the heads onto 'context', which context "
                      'parallel attention needs for the sequence')
  one = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes  # noqa: E731
  return P(one(batch), CONTEXT, one(heads), None), P(one(batch), CONTEXT)


def context_size() -> int:
  layout = active_layout()
  return 1 if layout is None else layout.sizes.get(CONTEXT, 1)


def check_length(length: int, size: int, impl: str) -> None:
  """Refuses a sequence length the context axis cannot split into its chunks."""
  per = 2 * size if impl == 'ring' else size
  if length % per:
    why = ('2 x context: each device holds two of 2C chunks' if impl == 'ring'
           else 'the context size')
    raise ConfigError(f'attention impl {impl!r} with parallel.mesh.context={size} needs a '
                      f'sequence length divisible by {per} ({why}), got {length}; choose '
                      'data.seq_len (and model.max_length) accordingly')


class _ContextAttention(nnx.Module):
  features = frozenset({'causal', 'padding', 'segments', 'window', 'softcap', 'bias'})
  takes_relative_bias = True  # position biases arrive as a RelativeBias (registry.py)

  option_defaults: dict = {}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    self.opts = registry.options(cfg, self.option_defaults)
    del num_heads, num_kv_heads, dtype, param_dtype, rngs, unused  # no parameters
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, **unused):
    del deterministic, dropout_rng, unused  # dropout is refused at build time
    if bias is not None and not isinstance(bias, RelativeBias):
      raise ValueError(f'attention impl {self.impl!r} takes a position bias as a RelativeBias, '
                       f'not a dense array ({_NO_BIAS})')
    if k.shape[1] != q.shape[1]:
      raise ValueError(f'attention impl {self.impl!r} is for self-attention: {q.shape[1]} '
                       f'queries, {k.shape[1]} keys')
    mask = AttentionMask() if mask is None else mask
    size = context_size()
    if size == 1:
      return self._one_device(q, k, v, mask, bias)
    check_length(q.shape[1], size, self.impl)
    layout = active_layout()
    qspec, sspec = _specs(layout, q, k)
    return self._sharded(q, k, v, mask, bias, size, layout.mesh, qspec, sspec)

  def _reference(self, q, k, v, mask, bias):
    if bias is not None:
      qp, kp = mask.positions(q.shape[1], k.shape[1])
      bias = bias(qp, kp)
    return dot_product_attention(q, k, v, mask, bias=bias, scale=self.scale,
                                 logit_softcap=self.logit_softcap)


@registry.register('dot_product', 'ring', unsupported=_COMMON)
class RingAttention(_ContextAttention):
  """Ring attention over the 'context' mesh axis (module docstring).

  Options (`model.attention.options`): `block_k` (default 512), the keys per inner tile of a
  block; a device's working set is [B, N, c, block_k] scores for chunks of c = L / 2C tokens
  (a chunk that `block_k` does not divide is one tile).
  """

  impl = 'ring'
  option_defaults = {'block_k': 512}
  example_options = {'block_k': 2}

  def __init__(self, cfg: AttentionConfig, **kwargs):
    super().__init__(cfg, **kwargs)
    block_k = self.opts['block_k']
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1:
      raise ConfigError(f'model.attention.options.block_k={block_k!r} is invalid: it must be '
                        'a positive integer')
    self.block_k = block_k

  def _sharded(self, q, k, v, mask, bias, size, mesh, qspec, sspec):
    return self._ring(q, k, v, mask, bias, size, mesh=mesh, axis_name=CONTEXT, qkv_spec=qspec,
                      mask_spec=sspec)

  def _one_device(self, q, k, v, mask, bias):
    if q.shape[1] % 2:
      return self._reference(q, k, v, mask, bias)
    return self._ring(q, k, v, mask, bias, 1)

  def _ring(self, q, k, v, mask, bias, size, **where):
    sched = ring.schedule(size, q.shape[1], causal=mask.causal, window=mask.window)
    return ring.ring_attention(q, k, v, *_local_mask_arrays(q, mask), sched=sched,
                               scale=self.scale, causal=mask.causal, window=mask.window,
                               logit_softcap=self.logit_softcap, block_k=self.block_k,
                               bias=bias, **where)


@registry.register('dot_product', 'context_allgather', unsupported=_COMMON)
class AllGatherContextAttention(_ContextAttention):
  """Local queries against all-gathered K/V over the 'context' mesh axis (module docstring)."""

  impl = 'context_allgather'

  def _one_device(self, q, k, v, mask, bias):
    return self._reference(q, k, v, mask, bias)

  def _sharded(self, q, k, v, mask, bias, size, mesh, qspec, sspec):
    del size
    local = lambda *a: self._local(*a, mask=mask)  # noqa: E731
    bspec = ring.bias_specs(bias, qspec[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(qspec,) * 3 + (sspec,) * 4 + (bspec,),
                         out_specs=qspec, check_vma=False)(q, k, v, *_local_mask_arrays(q, mask),
                                                           bias)

  def _local(self, q, k, v, qs, ks, qp, kp, bias, *, mask):
    gather = lambda x: jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)  # noqa: E731
    k, v, ks, kp = gather(k), gather(v), gather(ks), gather(kp)
    local = AttentionMask(q_segment_ids=qs, kv_segment_ids=ks, q_positions=qp, kv_positions=kp,
                          causal=mask.causal, window=mask.window)
    return self._reference(q, k, v, local, bias)
