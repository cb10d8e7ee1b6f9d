"""Memory-efficient chunked attention (Rabe & Staats 2021), the 'dot_product' / 'chunked' core.

Exact softmax attention computed over query chunks x key chunks without ever forming the T x S
score matrix. For one query chunk the key chunks are folded in with an online softmax (running
max m, sum l and accumulator a, Milakov & Gimelshein 2018):

    z_j = cap(s * q k_j^T + bias_j) masked,   m' = max(m, max_j z_j),
    l' = l e^(m - m') + sum_j e^(z_j - m'),   a' = a e^(m - m') + sum_j e^(z_j - m') v_j,
    out = a / l  (0 for a query that sees no key, like the dense core).

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim;
chunks of C_q queries and C_k keys. Lengths that are not multiples of the chunk are padded
internally (padded keys are masked, padded queries dropped). The mask (segment ids, positions,
causal, window, extra) and the bias are cut into the same blocks, so memory is
O(C_q C_k + T H) per head. `jax.checkpoint` around both the per-query-chunk and the per-key-chunk
function makes the backward pass recompute the blocks instead of storing them (the paper's
sec. 3), so the gradient is sub-quadratic in memory too. m is held out of differentiation: the
output does not depend on it, so the gradient is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import MASKED_LOGIT, query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig



def _pad_axis(x: jax.Array | None, axis: int, size: int, value=0) -> jax.Array | None:
  """Pads `axis` of x with `value` up to `size`."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _chunks(x: jax.Array | None, axis: int, chunk: int) -> jax.Array | None:
  """Splits `axis` into [n_chunks, chunk] and moves n_chunks to the front."""
  if x is None:
    return None
  x = x.reshape(x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: AttentionMask | None = None, *, bias: jax.Array | None = None,
                      scale: float | None = None, logit_softcap: float | None = None,
                      query_chunk: int = 1024, key_chunk: int = 4096) -> jax.Array:
  """Softmax attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H], chunk by chunk.

  Same semantics as `core.dot_product_attention` (mask rule, bias [B|1, N|1, T, S], soft-cap
  on the scaled scores plus bias, zero output for a query with no visible key).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = query_groups(n, kh)
  scale = h ** -0.5 if scale is None else scale
  mask = AttentionMask() if mask is None else mask
  cq, ck = min(query_chunk, t), min(key_chunk, s)
  tp, sp = -(-t // cq) * cq, -(-s // ck) * ck
  nq, nk = tp // cq, sp // ck

  qseg, kseg = mask.q_segment_ids, mask.kv_segment_ids
  if sp != s and kseg is None:  # padded keys must be masked; None means all ones (mask.dense)
    kseg = jnp.ones((b, s), jnp.int32)
  qpos, kpos = mask.positions(t, s) if (mask.causal or mask.window is not None) else (None, None)

  q_blocks = _chunks(_pad_axis(q, 1, tp), 1, cq)                       # [nq, B, Cq, N, H]
  q_side = (_chunks(_pad_axis(qseg, 1, tp), 1, cq), _chunks(_pad_axis(qpos, 1, tp), 1, cq))
  k_side = (_chunks(_pad_axis(k, 1, sp), 1, ck), _chunks(_pad_axis(v, 1, sp), 1, ck),
            _chunks(_pad_axis(kseg, 1, sp), 1, ck), _chunks(_pad_axis(kpos, 1, sp), 1, ck))

  def blocks2d(x, fill):  # [B|1, N|1, T, S] -> [nq, nk, B|1, N|1, Cq, Ck]
    if x is None:
      return None
    x = _pad_axis(_pad_axis(x, 2, tp, fill), 3, sp, fill)
    return jnp.moveaxis(_chunks(_chunks(x, 2, cq), 4, ck), 1, 0)

  bias_blocks = blocks2d(bias, 0.0)
  extra_blocks = blocks2d(mask.extra, False)

  def heads(x):  # [B|1, N|1, Cq, Ck] -> [B|1, K|1, G|1, Cq, Ck]
    return x.reshape(x.shape[0], kh, g, *x.shape[2:]) if x.shape[1] == n else x[:, :, None]

  def key_step(q_blk, q_seg, q_pos, carry, xs):
    m, l, acc = carry
    k_blk, v_blk, k_seg, k_pos, bias_blk, extra_blk = xs
    z = jnp.einsum('BTKGH,BSKH->BKGTS', q_blk, k_blk, preferred_element_type=jnp.float32)
    z = z * scale
    if bias_blk is not None:
      z = z + heads(bias_blk.astype(jnp.float32))
    if logit_softcap is not None:
      z = logit_softcap * jnp.tanh(z / logit_softcap)
    allowed = AttentionMask(q_segment_ids=q_seg, kv_segment_ids=k_seg, q_positions=q_pos,
                            kv_positions=k_pos, extra=extra_blk, causal=mask.causal,
                            window=mask.window).dense(cq, ck)
    if allowed is not None:
      allowed = heads(allowed)
      z = jnp.where(allowed, z, MASKED_LOGIT)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, z.max(-1)))
    p = jnp.exp(z - m_new[..., None])
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(-1)
    pv = jnp.einsum('BKGTS,BSKH->BKGTH', p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return (m_new, l, acc * alpha[..., None] + pv), None

  def query_step(xs):
    q_blk, q_seg, q_pos, bias_row, extra_row = xs
    q_blk = q_blk.reshape(b, cq, kh, g, h)
    init = (jnp.full((b, kh, g, cq), MASKED_LOGIT, jnp.float32), jnp.zeros((b, kh, g, cq), jnp.float32),
            jnp.zeros((b, kh, g, cq, h), jnp.float32))
    step = jax.checkpoint(lambda c, x: key_step(q_blk, q_seg, q_pos, c, x), prevent_cse=False)
    (_, l, acc), _ = jax.lax.scan(step, init, k_side + (bias_row, extra_row))
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return jnp.einsum('BKGTH->BTKGH', out).reshape(b, cq, n, h)

  out = jax.lax.map(jax.checkpoint(query_step, prevent_cse=False),
                    (q_blocks,) + q_side + (bias_blocks, extra_blocks))  # [nq, B, Cq, N, H]
  out = jnp.moveaxis(out, 0, 1).reshape(b, tp, n, h)[:, :t]
  return out.astype(q.dtype)


@registry.register('dot_product', 'chunked', unsupported={
    'weights': 'the chunked core never forms the n x n probabilities it would have to return',
    'shaw': "Shaw's value term needs the full probability matrix [B, N, T, S]",
    'dropout': 'a dropout pattern drawn per block would depend on the chunk sizes and could not '
               "reproduce the dense core's mask; use impl 'xla' for attention dropout",
})
class ChunkedDotProductAttention(nnx.Module):
  """Exact softmax attention in O(n) memory (see module docstring).

  Options (`model.attention.options`): `query_chunk` (default 1024) and `key_chunk` (default
  4096), each capped at the actual length.
  """

  features = frozenset({'causal', 'padding', 'segments', 'bias', 'decode', 'cross', 'window',
                        'softcap'})
  example_options = {'query_chunk': 4, 'key_chunk': 2}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'query_chunk': 1024, 'key_chunk': 4096})
    del dtype, param_dtype, rngs, unused  # no parameters
    for name in ('query_chunk', 'key_chunk'):
      if int(opts[name]) < 1:
        raise ValueError(f'model.attention.options.{name} must be >= 1, got {opts[name]}')
    self.query_chunk, self.key_chunk = int(opts['query_chunk']), int(opts['key_chunk'])
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, **unused):
    del deterministic, dropout_rng, unused  # 'dropout' is refused at build time
    return chunked_attention(q, k, v, mask, bias=bias, scale=self.scale,
                             logit_softcap=self.logit_softcap, query_chunk=self.query_chunk,
                             key_chunk=self.key_chunk)
