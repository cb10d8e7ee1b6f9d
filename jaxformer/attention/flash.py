"""Fused exact attention: the 'dot_product' kind with impl 'pallas' and 'cudnn' (catalog A8).

Both compute the same function as the reference 'xla' core (`core.dot_product_attention`):

  * 'pallas': jaxformer's own FlashAttention-2 kernels (`jaxformer.kernels.flash_attention`),
    forward and backward, Triton schedule on GPU, Mosaic schedule on TPU, interpret mode on CPU
    (exact but slow: for tests and small runs). The mask is evaluated inside the kernel from
    segment ids and positions, so packed sequences, padding, causal and sliding-window masks,
    cross-attention and KV-cached decoding all work, GQA reads each kv head once, and an additive
    bias (T5 relative buckets, ALiBi) is read tile by tile and gets its gradient.
  * 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, NVIDIA GPUs only, fp16 /
    bf16. Self-attention whose positions are the model's own (one positions array for queries
    and keys) uses cuDNN's causal / sliding-window masks; segment ids become a boolean mask;
    decoding and explicit positions use the full boolean mask.

`impl='auto'` (see `registry.resolve_impl`) picks cuDNN, then Pallas, on GPU; Pallas on TPU; the
XLA reference on CPU; each only when it provides every feature the model needs.

Under a device mesh both run inside `jax.shard_map` over the batch and head axes
(`jaxformer.parallel.sharding.shard_kernel`): XLA cannot partition a custom kernel call, and
would otherwise gather q, k and v onto every device. Attention is independent across batch rows
and heads, so each device runs the kernel on its slice with no communication.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig
from jaxformer.kernels import flash_attention as fa
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import shard_kernel

# Logical names of the kernel arguments, for shard_kernel.
_NAMES = {
    'q': R.QUERIES, 'k': R.KEYS, 'v': R.KEYS,
    'q_segment_ids': (R.BATCH, None), 'kv_segment_ids': (R.BATCH, None),
    'q_positions': (R.BATCH, None), 'kv_positions': (R.BATCH, None),
    'bias': (R.BATCH, R.HEADS, None, None), 'mask': (R.BATCH, None, None, None),
}

_NO_DROPOUT = ('a fused kernel draws no dropout pattern that could reproduce the reference '
               "core's; use impl 'xla' for attention dropout")
_NO_WEIGHTS = 'a fused kernel never forms the [T, S] probabilities it would have to return'
_NO_SHAW = "Shaw's value term needs the full probability matrix [B, N, T, S]"


def _no_extra(mask: AttentionMask | None, impl: str) -> None:
  if mask is not None and mask.extra is not None:
    raise ValueError(f"attention impl {impl!r} takes masks as segment ids, positions, causal "
                     "and window only; AttentionMask.extra (an arbitrary dense mask) needs "
                     "impl 'xla' or 'chunked'")


@registry.register('dot_product', 'pallas', unsupported={
    'dropout': _NO_DROPOUT, 'weights': _NO_WEIGHTS, 'shaw': _NO_SHAW})
class PallasDotProductAttention(nnx.Module):
  """Flash attention in Pallas (module docstring).

  Options (`model.attention.options`): `block_q`, `block_k` (forward tiles), `block_q_bwd`,
  `block_k_bwd` (backward tiles), each a power of two, default per schedule
  (`kernels.flash_attention.BlockSizes.default`); `schedule` ('gpu' / 'tpu', default the
  backend's); `interpret` (default: True off GPU/TPU).
  """

  features = frozenset({'causal', 'padding', 'segments', 'bias', 'decode', 'cross', 'window',
                        'softcap'})
  example_options = {'block_q': 16, 'block_k': 16, 'block_q_bwd': 16, 'block_k_bwd': 16}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'block_q': None, 'block_k': None, 'block_q_bwd': None,
                                  'block_k_bwd': None, 'schedule': None, 'interpret': None})
    del num_heads, num_kv_heads, dtype, param_dtype, rngs, unused  # no parameters
    if opts['schedule'] is not None and opts['schedule'] not in fa.SCHEDULES:
      raise ValueError(f"model.attention.options.schedule={opts['schedule']!r} is invalid: "
                       f'allowed values are {list(fa.SCHEDULES)}')
    self.schedule = opts['schedule']
    self.interpret = opts['interpret']
    schedule = self.schedule or ('tpu' if jax.default_backend() == 'tpu' else 'gpu')
    blocks = fa.BlockSizes.default(schedule)
    sizes = {name: opts[name] if opts[name] is not None else getattr(blocks, name)
             for name in ('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd')}
    for name, val in sizes.items():
      if not isinstance(val, int) or val < 8 or val & (val - 1):
        raise ValueError(f'model.attention.options.{name}={val!r} is invalid: it must be a '
                         'power of two >= 8')
    self.block_sizes = fa.BlockSizes(**sizes)
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, **unused):
    del deterministic, dropout_rng, unused  # dropout is refused at build time
    _no_extra(mask, 'pallas')
    mask = AttentionMask() if mask is None else mask
    args = dict(q=q, k=k, v=v, q_segment_ids=mask.q_segment_ids,
                kv_segment_ids=mask.kv_segment_ids, q_positions=mask.q_positions,
                kv_positions=mask.kv_positions, bias=bias)
    kernel = lambda **a: fa.flash_attention(  # noqa: E731
        **a, causal=mask.causal, window=mask.window, scale=self.scale,
        logit_softcap=self.logit_softcap, block_sizes=self.block_sizes, schedule=self.schedule,
        interpret=self.interpret)
    return shard_kernel(kernel, args, _NAMES, R.QUERIES)


def cudnn_arguments(q_len: int, kv_len: int, mask: AttentionMask | None) -> dict:
  """`jax.nn.dot_product_attention` keyword arguments expressing `mask`.

  cuDNN's causal and sliding-window masks count indices, so they are used only when queries
  and keys share one positions array (self-attention without a cache, where position order is
  index order within every segment); otherwise the full boolean mask is passed.
  """
  if mask is None:
    return {}
  _no_extra(mask, 'cudnn')
  shared = q_len == kv_len and (mask.q_positions is None or mask.q_positions is mask.kv_positions)
  if not shared:
    allowed = mask.dense(q_len, kv_len)
    return {} if allowed is None else {'mask': allowed}
  args = {}
  if mask.causal:
    args['is_causal'] = True
    if mask.window is not None:
      args['local_window_size'] = (mask.window - 1, 0)
  elif mask.window is not None:
    # cuDNN has no right window; the band goes into the boolean mask below.
    args['mask'] = mask.replace(q_segment_ids=None, kv_segment_ids=None).dense(q_len, kv_len)
  if mask.q_segment_ids is not None or mask.kv_segment_ids is not None:
    seg = AttentionMask(q_segment_ids=mask.q_segment_ids,
                        kv_segment_ids=mask.kv_segment_ids).dense(q_len, kv_len)
    args['mask'] = seg if 'mask' not in args else args['mask'] & seg
  return args


@registry.register('dot_product', 'cudnn', unsupported={
    'softcap': "jax.nn.dot_product_attention has no logit soft-capping; use impl 'pallas'",
    'dropout': _NO_DROPOUT, 'weights': _NO_WEIGHTS, 'shaw': _NO_SHAW})
class CudnnDotProductAttention(nnx.Module):
  """cuDNN fused attention through `jax.nn.dot_product_attention` (module docstring).

  Options: `implementation` ('cudnn', default; 'xla' runs the same call on XLA's own
  implementation, for testing the mask translation off GPU).
  """

  features = frozenset({'causal', 'padding', 'segments', 'bias', 'decode', 'cross', 'window'})
  # The generic tests run on CPU too: there they check the mask translation on XLA's kernel.
  example_options = {'implementation': 'xla'}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'implementation': 'cudnn'})
    del num_heads, num_kv_heads, dtype, param_dtype, rngs, unused  # no parameters
    if opts['implementation'] not in ('cudnn', 'xla'):
      raise ValueError('model.attention.options.implementation='
                       f"{opts['implementation']!r} is invalid: allowed values are "
                       "['cudnn', 'xla']")
    self.implementation = opts['implementation']
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, **unused):
    del deterministic, dropout_rng, unused  # dropout is refused at build time
    if self.implementation == 'cudnn' and jax.default_backend() != 'gpu':
      raise ValueError("attention impl 'cudnn' needs an NVIDIA GPU (backend is "
                       f"{jax.default_backend()!r}); use impl 'auto', 'pallas' or 'xla'")
    args = cudnn_arguments(q.shape[1], k.shape[1], mask)
    if 'mask' in args:
      args['mask'] = jnp.broadcast_to(args['mask'], (q.shape[0], 1) + args['mask'].shape[2:])
    if bias is not None:
      bias = bias.astype(q.dtype)
    flags = {k: args.pop(k) for k in ('is_causal', 'local_window_size') if k in args}

    def kernel(q, k, v, bias=None, mask=None):
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                         implementation=self.implementation, **flags)
      if mask is not None:
        # A query row that sees no key (padding) returns 0, as in the reference core.
        out = jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None, None], out, 0)
      return out

    return shard_kernel(kernel, dict(q=q, k=k, v=v, bias=bias, mask=args.get('mask')), _NAMES,
                        R.QUERIES)
