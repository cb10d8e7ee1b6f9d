"""Block-sparse softmax attention: the engine shared by the sparse kinds (CATALOG B1-B5).

The queries are cut into C blocks of Q = `block_size` rows (the last block padded). Query block c
reads only the W keys listed in a static table `keys[c]` (numpy, built at trace time from the
sequence length and the kind's options; -1 marks an unused slot). For a query t of block c

    allowed[t, s] = mask(t, s) and pattern(pos_t, pos_s)           for s in keys[c]
    out_t = sum_s softmax_s(cap(scale * q_t . k_s) masked by allowed) v_s

where `mask` is the AttentionMask rule (segment ids with 0 = padding, causal, window, extra) and
`pattern` the kind's element pattern on positions. Keys outside keys[c] count as masked, so the
result equals dense attention with `extra = pattern` as long as keys[c] lists every key the
pattern allows to some query of block c (each kind's table is built that way).

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim, C query
blocks, Q rows per block, W keys per block. GQA reshapes the queries to [.., K, G, H] as core.py
does; keys and values are gathered once per kv head as [B, C, W, K, H]. Logits and softmax are
float32, [B, C, K, G, Q, W]: memory O(B N T W) instead of O(B N T S). A query row with no visible
key returns exactly 0 (masked probabilities are zeroed after the softmax, as in core.py).

Two optional passes cover keys that a per-block list would repeat in every block: `shared`
(one static list of columns read by all queries, e.g. the Sparse Transformer's summary columns,
logits [B, T, K, G, W]) and `strided` (keys at index distances that are multiples of l, computed
per residue class mod l as [T / l, T / l] blocks). Each pass yields an unnormalised numerator,
row max and row sum over its own (disjoint) keys; rescaling to a common max and dividing by the
summed denominators gives exactly the softmax over the union.

Global rows: kinds whose first queries attend to every key (Longformer global tokens, BigBird
global blocks) pass `global_rows=g`; those g rows are recomputed densely, g x S, and replace the
block rows, so no row of the table needs to list all S keys.

Decoding (T != S: T new queries over S cache slots): the element pattern is evaluated directly
on the [T, S] positions and `core.dot_product_attention` runs with it as the extra mask; that is
T x S, linear in the cache length for the few queries of a decoding step.

Positions: the pattern is read on positions (like AttentionMask's window) while the table is
built from indices 0..S-1. The two agree when positions are the indices (the default), and for
relative patterns also when positions advance by one per token within each segment (packed
sequences restarting at 0, left padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.attention.core import MASKED_LOGIT, dot_product_attention, query_groups
from jaxformer.attention.mask import AttentionMask

# pattern(q_pos [.., 1, Tq, 1], kv_pos [.., 1, 1, Sk]) -> bool [.., N|1, Tq, Sk]
Pattern = Callable[[jax.Array, jax.Array], jax.Array]


def pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
  """Per-block key lists -> a read-only table [C, W] of sorted unique indices, -1 padded."""
  rows = [np.unique(np.asarray(r, np.int64)) for r in rows]
  width = max(1, max(len(r) for r in rows))
  table = np.full((len(rows), width), -1, np.int32)
  for i, r in enumerate(rows):
    table[i, :len(r)] = r
  table.flags.writeable = False
  return table


# Query blocks computed together in one step of the block loop (see _block_pass).
_BLOCKS_PER_STEP = 8


def _with_pattern(mask: AttentionMask, pattern: Pattern, qpos, kpos) -> AttentionMask:
  """`mask` with the pattern over every (query, key) pair [T, S] added to its extra term."""
  allowed = pattern(qpos[:, None, :, None], kpos[:, None, None, :])
  extra = allowed if mask.extra is None else jnp.logical_and(mask.extra, allowed)
  return mask.replace(q_positions=qpos, kv_positions=kpos, extra=extra)


def _heads(allowed: jax.Array, axis: int, kh: int, g: int) -> jax.Array:
  """Splits a head axis of size N (or 1) into (K, G) (or (1, 1)) for GQA."""
  split = (kh, g) if allowed.shape[axis] > 1 else (1, 1)
  return allowed.reshape(allowed.shape[:axis] + split + allowed.shape[axis + 1:])


def _rule(mask: AttentionMask, qseg, kseg, qpos, kpos, rows: int, cols: int):
  """The AttentionMask rule (segments, causal, window) on batched [.., rows] x [.., cols]."""
  return AttentionMask(q_segment_ids=qseg, kv_segment_ids=kseg, q_positions=qpos,
                       kv_positions=kpos, causal=mask.causal, window=mask.window
                       ).dense(rows, cols)


def _and(a, b):
  return b if a is None else (a if b is None else jnp.logical_and(a, b))


def _partial(logits, allowed, scale, logit_softcap, dropout_rate, dropout_rng):
  """Unnormalised softmax pieces: weights e (dropped out), row max and row sum (before dropout).

  softmax = e / sum e with e = exp(logit - max) on allowed keys; passes over disjoint key sets
  combine exactly by rescaling to a common max (`_merge`).
  """
  logits = logits * scale
  if logit_softcap is not None:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  logits = jnp.where(allowed, logits, MASKED_LOGIT)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  total = e.sum(-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, e.shape)
    e = jnp.where(keep, e / (1.0 - dropout_rate), 0.0)
  return e, top[..., 0], total


def _merge(parts):
  """Parts (num [B, T, K, G, H], max [B, T, K, G], sum [B, T, K, G]) -> softmax output."""
  top = parts[0][1]
  for _, m, _ in parts[1:]:
    top = jnp.maximum(top, m)
  num = den = 0.0
  for n_, m, s in parts:
    a = jnp.exp(m - top)
    num, den = num + n_ * a[..., None], den + s * a
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _block_pass(q, k, v, mask, pattern, table, qpos, kpos, block_size, weights):
  """Query blocks of Q rows over their listed keys (table [C, W]).

  The blocks run under `lax.map` in groups of `_BLOCKS_PER_STEP`, each group rematerialised in
  the backward pass, so only one group's gathered keys, values and probabilities are alive at a
  time: memory O(T + group x Q x W) instead of O(C x Q x W) for all blocks at once.
  """
  b, t, kh, g, h = q.shape
  c, w = table.shape
  tp = c * block_size
  qb = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0))).reshape(
      b, c, block_size, kh, g, h)
  qp = jnp.pad(jnp.broadcast_to(qpos, (b, t)), ((0, 0), (0, tp - t)), mode='edge')
  qp = qp.reshape(b, c, block_size)
  kp_all = jnp.broadcast_to(kpos, (b, t))
  qseg, kseg = mask.q_segment_ids, mask.kv_segment_ids
  if qseg is not None:
    qseg = jnp.pad(qseg, ((0, 0), (0, tp - t))).reshape(b, c, block_size)
  ex = None
  if mask.extra is not None:
    ex = mask.extra.astype(bool)
    eb, en = ex.shape[:2]
    ex = jnp.pad(ex, ((0, 0), (0, 0), (0, tp - t), (0, 0))).reshape(eb, en, c, block_size, t)
  rows = jnp.asarray(table)
  rng = weights.get('dropout_rng')

  def one(i):
    row = rows[i]
    idx = jnp.maximum(row, 0)
    kg, vg = jnp.take(k, idx, axis=1), jnp.take(v, idx, axis=1)  # [B, W, K, H]
    logits = jnp.einsum('BQKGH,BWKH->BKGQW', qb[:, i], kg, preferred_element_type=jnp.float32)
    qpi, kp = qp[:, i], jnp.take(kp_all, idx, axis=1)  # [B, Q], [B, W]
    allowed = pattern(qpi[:, None, :, None], kp[:, None, None, :])  # [B, 1|N, Q, W]
    allowed = jnp.logical_and(allowed, (row >= 0)[None, None, None, :])
    rule = _rule(mask, None if qseg is None else qseg[:, i],
                 None if kseg is None else jnp.take(kseg, idx, axis=1), qpi, kp, block_size, w)
    allowed = _and(allowed, rule)
    if ex is not None:
      allowed = jnp.logical_and(allowed, jnp.take(ex[:, :, i], idx, axis=-1))
    block_weights = dict(weights)
    if rng is not None:
      block_weights['dropout_rng'] = jax.random.fold_in(rng, i)
    e, top, total = _partial(logits, _heads(allowed, 1, kh, g), **block_weights)
    num = jnp.einsum('BKGQW,BWKH->BQKGH', e.astype(v.dtype), vg,
                     preferred_element_type=jnp.float32)
    return num, top, total

  num, top, total = jax.lax.map(jax.checkpoint(one), jnp.arange(c),
                                batch_size=min(c, _BLOCKS_PER_STEP))
  num = jnp.moveaxis(num, 0, 1).reshape(b, tp, kh, g, h)[:, :t]
  # [C, B, K, G, Q] -> [B, C, Q, K, G] -> [B, T, K, G]
  stat = lambda x: x.transpose(1, 0, 4, 2, 3).reshape(b, tp, kh, g)[:, :t]
  return num, stat(top), stat(total)


def _shared_pass(q, k, v, mask, pattern, columns, qpos, kpos, weights):
  """Every query over one static list of W key columns (summary columns, global keys)."""
  b, t, kh, g, h = q.shape
  kg, vg = jnp.take(k, columns, axis=1), jnp.take(v, columns, axis=1)
  logits = jnp.einsum('BTKGH,BWKH->BTKGW', q, kg, preferred_element_type=jnp.float32)
  kp = jnp.take(kpos, columns, axis=1)
  allowed = pattern(qpos[:, None, :, None], kp[:, None, None, :])  # [B|1, N|1, T, W]
  kseg = None if mask.kv_segment_ids is None else jnp.take(mask.kv_segment_ids, columns, axis=1)
  allowed = _and(allowed, _rule(mask, mask.q_segment_ids, kseg, qpos, kp, t, len(columns)))
  if mask.extra is not None:
    allowed = jnp.logical_and(allowed, jnp.take(mask.extra.astype(bool), columns, axis=-1))
  allowed = _heads(allowed, 1, kh, g).transpose(0, 3, 1, 2, 4)  # [B|1, T, K|1, G|1, W]
  e, top, total = _partial(logits, allowed, **weights)
  num = jnp.einsum('BTKGW,BWKH->BTKGH', e.astype(v.dtype), vg, preferred_element_type=jnp.float32)
  return num, top, total


def _strided_pass(q, k, v, mask, pattern, stride, qpos, kpos, weights):
  """Queries over the keys of the same residue mod `stride`: index m * l + r -> [r, m]."""
  b, t, kh, g, h = q.shape
  rows = -(-t // stride)
  tp = rows * stride

  def split(x, mode='constant'):  # [B, T, ...] -> [B, l, R, ...], padded rows zero / edge
    x = jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2), mode=mode)
    return jnp.swapaxes(x.reshape((x.shape[0], rows, stride) + x.shape[2:]), 1, 2)

  qr, kr, vr = split(q), split(k), split(v)
  logits = jnp.einsum('BLRKGH,BLMKH->BLKGRM', qr, kr, preferred_element_type=jnp.float32)
  qp = split(jnp.broadcast_to(qpos, (b, t)), mode='edge')
  kp = split(jnp.broadcast_to(kpos, (b, t)), mode='edge')
  allowed = pattern(qp[:, :, None, :, None], kp[:, :, None, None, :])  # [B, l, N|1, R, R]
  valid = (np.arange(tp).reshape(rows, stride).T < t)[None, :, None, None, :]
  allowed = jnp.logical_and(allowed, valid)
  flat = lambda x: None if x is None else split(x).reshape(b * stride, rows)
  rule = _rule(mask, flat(mask.q_segment_ids), flat(mask.kv_segment_ids),
               qp.reshape(b * stride, rows), kp.reshape(b * stride, rows), rows, rows)
  if rule is not None:
    allowed = jnp.logical_and(allowed, rule.reshape(b, stride, 1, rows, rows))
  if mask.extra is not None:
    ex = mask.extra.astype(bool)
    eb, en = ex.shape[:2]
    ex = jnp.pad(ex, ((0, 0), (0, 0), (0, tp - t), (0, tp - t)))
    ex = jnp.diagonal(ex.reshape(eb, en, rows, stride, rows, stride), axis1=3, axis2=5)
    allowed = jnp.logical_and(allowed, ex.transpose(0, 4, 1, 2, 3))
  e, top, total = _partial(logits, _heads(allowed, 2, kh, g), **weights)
  num = jnp.einsum('BLKGRM,BLMKH->BRLKGH', e.astype(v.dtype), vr,
                   preferred_element_type=jnp.float32).reshape(b, tp, kh, g, h)[:, :t]
  stat = lambda x: x.transpose(0, 4, 1, 2, 3).reshape(b, tp, kh, g)[:, :t]
  return num, stat(top), stat(total)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: AttentionMask | None, *, block_size: int,
                           keys: Callable[[], np.ndarray], pattern: Pattern,
                           block_pattern: Pattern | None = None,
                           shared: tuple[np.ndarray, Pattern] | None = None,
                           strided: tuple[int, Pattern] | None = None,
                           global_rows: int = 0, scale: float | None = None,
                           logit_softcap: float | None = None, dropout_rate: float = 0.0,
                           dropout_rng: jax.Array | None = None) -> jax.Array:
  """Sparse softmax attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H].

  Args:
    mask: segment ids / positions / causal / window / extra, or None.
    block_size: Q, the query rows per block.
    keys: returns the table [ceil(S / Q), W] of key indices per query block (-1 = unused); only
      called when T == S.
    pattern: the kind's whole element pattern on positions (see `Pattern`); may carry a head
      axis N. Used for decoding and global rows.
    block_pattern: the part of the pattern the key table covers (default: `pattern`).
    shared: (columns [W], pattern) for keys every query may read (one gather, not one per block).
    strided: (l, pattern) for keys at index distances that are multiples of l, computed per
      residue class as [T / l, T / l] blocks. The three parts must allow disjoint key sets whose
      union is `pattern`.
    global_rows: the first `global_rows` queries are computed densely over all S keys.
    scale, logit_softcap, dropout_rate, dropout_rng: as in `core.dot_product_attention`.
  """
  mask = AttentionMask() if mask is None else mask
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = query_groups(n, kh)
  scale = h ** -0.5 if scale is None else scale
  qpos, kpos = mask.positions(t, s)
  dense = dict(scale=scale, logit_softcap=logit_softcap, dropout_rate=dropout_rate)
  if t != s:
    return dot_product_attention(q, k, v, _with_pattern(mask, pattern, qpos, kpos),
                                 dropout_rng=dropout_rng, **dense)

  table = keys()
  if table.shape[0] != -(-t // block_size):
    raise ValueError(f'key table has {table.shape[0]} rows for {t} queries in blocks of '
                     f'{block_size}')
  rng = lambda i: None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
  weights = lambda i: dict(scale=scale, logit_softcap=logit_softcap, dropout_rate=dropout_rate,
                           dropout_rng=rng(i))
  qg = q.reshape(b, t, kh, g, h)
  parts = [_block_pass(qg, k, v, mask, block_pattern or pattern, table, qpos, kpos, block_size,
                       weights(0))]
  if shared is not None and len(shared[0]):
    parts.append(_shared_pass(qg, k, v, mask, shared[1], np.asarray(shared[0]), qpos, kpos,
                              weights(1)))
  if strided is not None:
    parts.append(_strided_pass(qg, k, v, mask, strided[1], strided[0], qpos, kpos, weights(2)))
  out = _merge(parts).reshape(b, t, n, h).astype(q.dtype)

  rows = min(global_rows, t)
  if rows > 0:
    head = mask.replace(
        q_segment_ids=None if mask.q_segment_ids is None else mask.q_segment_ids[:, :rows],
        extra=None if mask.extra is None else mask.extra[..., :rows, :])
    head = _with_pattern(head, pattern, qpos[:, :rows], kpos)
    top = dot_product_attention(q[:, :rows], k, v, head, dropout_rng=rng(3), **dense)
    out = out.at[:, :rows].set(top)
  return out
