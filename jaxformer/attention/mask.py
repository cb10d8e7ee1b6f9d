"""A structured description of which keys each query may see.

Attention kinds receive this description rather than a dense [T, S] matrix, so that block-sparse,
linear and kernel implementations can compute their own masks block by block without ever
materialising n x n. `dense()` builds the boolean matrix for the kinds that want it and for tests.

Rule (all terms optional):
  allowed[b, t, s] = q_seg[b,t] != 0 and kv_seg[b,s] != 0 and q_seg[b,t] == kv_seg[b,s]
                     and (not causal or kv_pos[b,s] <= q_pos[b,t])
                     and (window is None or |q_pos[b,t] - kv_pos[b,s]| < window, one-sided if causal)
                     and extra[b|1, n|1, t, s]
Segment id 0 marks padding, so a padding mask is `segment_ids = mask.astype(int32)`, and packed
sequences use ids 1, 2, 3, ...
With `kv_prefix` = P > 0 the keys are [P prefix keys; S keys of the sequence] (prefix tuning,
Li & Liang 2021): every query with q_seg != 0 sees all P prefix keys, whatever its segment,
position or window; the rule above applies to the other S keys (segment ids, positions and
`extra` describe those S keys only). Positions default to arange; for KV-cached decoding the query
positions are the absolute positions of the new tokens and the cache slots hold their own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AttentionMask:
  q_segment_ids: jax.Array | None = None   # [B, T] int, 0 = padding
  kv_segment_ids: jax.Array | None = None  # [B, S] int, 0 = padding
  q_positions: jax.Array | None = None     # [B, T] int
  kv_positions: jax.Array | None = None    # [B, S] int
  extra: jax.Array | None = None           # [B|1, N|1, T, S] bool, arbitrary extra mask
  causal: bool = struct.field(pytree_node=False, default=False)
  window: int | None = struct.field(pytree_node=False, default=None)
  kv_prefix: int = struct.field(pytree_node=False, default=0)

  @classmethod
  def build(cls, *, q_len: int, kv_len: int | None = None, batch: int = 1,
            padding: jax.Array | None = None, kv_padding: jax.Array | None = None,
            segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
            causal: bool = False, window: int | None = None,
            extra: jax.Array | None = None) -> 'AttentionMask':
    """Convenience constructor from boolean padding masks ([B, T], True = real token)."""
    kv_len = q_len if kv_len is None else kv_len
    if segment_ids is None and padding is not None:
      segment_ids = padding.astype(jnp.int32)
    if kv_segment_ids is None and kv_padding is not None:
      kv_segment_ids = kv_padding.astype(jnp.int32)
    if kv_segment_ids is None and segment_ids is not None and kv_len == q_len and kv_padding is None:
      kv_segment_ids = segment_ids
    if segment_ids is None and kv_segment_ids is not None:
      b = kv_segment_ids.shape[0]
      segment_ids = jnp.ones((b, q_len), jnp.int32)
      if kv_len == q_len:
        segment_ids = (kv_segment_ids != 0).astype(jnp.int32) * kv_segment_ids
    if kv_segment_ids is None and segment_ids is not None:
      kv_segment_ids = jnp.ones((segment_ids.shape[0], kv_len), jnp.int32)
    return cls(q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_positions=positions,
               kv_positions=kv_positions, extra=extra, causal=causal, window=window)

  def replace(self, **kw) -> 'AttentionMask':
    return dataclasses.replace(self, **kw)

  def positions(self, q_len: int, kv_len: int):
    """(q_positions [B|1, T], kv_positions [B|1, S]) with arange defaults."""
    qp = self.q_positions if self.q_positions is not None else jnp.arange(q_len)[None]
    kp = self.kv_positions if self.kv_positions is not None else jnp.arange(kv_len)[None]
    return qp, kp

  def dense(self, q_len: int, kv_len: int) -> jax.Array | None:
    """Boolean mask [B|1, 1|N, T, S] (True = may attend), or None when nothing is masked."""
    if self.kv_prefix:
      return self._with_prefix(q_len, kv_len)
    m = None

    def conj(a, b):
      return b if a is None else jnp.logical_and(a, b)

    if self.q_segment_ids is not None or self.kv_segment_ids is not None:
      qs = self.q_segment_ids if self.q_segment_ids is not None else jnp.ones((1, q_len), jnp.int32)
      ks = self.kv_segment_ids if self.kv_segment_ids is not None else jnp.ones((1, kv_len), jnp.int32)
      seg = (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0) & (ks[:, None, :] != 0)
      m = conj(m, seg[:, None])
    if self.causal or self.window is not None:
      qp, kp = self.positions(q_len, kv_len)
      diff = qp[:, :, None] - kp[:, None, :]  # t - s
      if self.causal:
        m = conj(m, (diff >= 0)[:, None])
      if self.window is not None:
        band = diff < self.window if self.causal else jnp.abs(diff) < self.window
        m = conj(m, band[:, None])
    if self.extra is not None:
      m = conj(m, self.extra.astype(bool))
    return m

  def _with_prefix(self, q_len: int, kv_len: int) -> jax.Array:
    """[prefix columns, seen by every non-padding query; the sequence's own rule]."""
    p = self.kv_prefix
    rest = self.replace(kv_prefix=0).dense(q_len, kv_len - p)
    if rest is None:
      rest = jnp.ones((1, 1, q_len, kv_len - p), bool)
    if self.q_segment_ids is not None:
      seen = jnp.broadcast_to((self.q_segment_ids != 0)[:, None, :, None],
                              (self.q_segment_ids.shape[0], 1, q_len, p))
    else:
      seen = jnp.ones((1, 1, q_len, p), bool)
    lead = jnp.broadcast_shapes(rest.shape[:2], seen.shape[:2])
    return jnp.concatenate([jnp.broadcast_to(seen, lead + seen.shape[2:]),
                            jnp.broadcast_to(rest, lead + rest.shape[2:])], axis=-1)
