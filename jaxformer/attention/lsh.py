"""Reformer LSH attention (Kitaev et al. 2020, sec. 2), the 'lsh' / 'xla' core.

Shared-QK attention: the keys are the unit-length queries, k_j = q_j / |q_j|, so the incoming
k is not used (the layer still projects it; with GQA the query heads hash and attend, and query
head n reads value head n // G). Angular LSH (Andoni et al. 2015) with one random Gaussian
matrix R_r [H, b/2] per hashing round r = 1..n_hashes:

    h_r(x) = argmax([x R_r ; -x R_r])  in {0, ..., b - 1}      (b = n_buckets; b = 1: no hashing)

In every round the tokens are sorted by (segment, bucket, index), padding (segment id 0) last,
and cut into chunks of C = chunk_size sorted tokens; c_r(j) is the chunk of token j. Query i
attends in round r to

    P_r(i) = {j : h_r(j) = h_r(i), c_r(j) in {c_r(i) - 1, c_r(i)}}   ∩ {j visible from i}

(its own chunk and the one before; visibility is the mask: equal non-zero segment ids and, when
causal, kv position <= query position). Logits are s * q_i . k_j (s = head_dim^-0.5 unless
`model.attention.scale`); the self-mask replaces the logit of j = i by -1e5, so a token attends
to itself only when nothing else is visible. Rounds are combined with their log-sum-exps
L_r(i) (the paper's eq. for multi-round attention):

    o_i = sum_r exp(L_r(i) - logsumexp_r' L_r'(i)) o_r(i),

where round r lowers the logit of key j by log N_ij, N_ij = |{r' : j in P_r'(i)}| (the paper's
de-duplication, computed exactly from every round's buckets and chunks). Hence o_i is exactly
softmax attention over the union of the P_r(i), each key counted once; with one bucket, one hash
and C >= n it is full shared-QK attention with the self-mask (the test oracle).

Memory is O(n C) per head and round: logits live as [B, N, R, n / C, C, 2C]. The rotations are
drawn from the fixed `seed` option (every call, train and eval, and every layer use the same
rotations; the layers' queries differ, so their buckets do), so the core is deterministic.
Sorting segment first keeps the chunk boundaries of one packed segment independent of the
contents of the others and of padding. With C < n the chunk boundaries of a causal sequence
depend on the buckets of later tokens (they shift the sorted ranks): no query ever reads a later
key, but which earlier same-bucket keys share its chunks can change with later tokens, which is
why KV-cached decoding is refused.

Options (`model.attention.options`): n_buckets (8; 1 or even), n_hashes (2), chunk_size (64),
seed (0), self_mask (True; False lets a token attend to itself like any other key).
Shapes: B batch, T length, N query heads, K kv heads, H head dim, R rounds, C chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import MASKED_LOGIT, query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, fail

SELF_LOGIT = -1e5  # the paper's self-mask value: below any real logit, far above MASKED_LOGIT

DEFAULTS = {'n_buckets': 8, 'n_hashes': 2, 'chunk_size': 64, 'seed': 0, 'self_mask': True}


def random_rotations(seed: int, head_dim: int, n_hashes: int, n_buckets: int) -> jax.Array:
  """The Gaussian hashing matrices R [H, n_hashes, n_buckets // 2] drawn from `seed`."""
  return jax.random.normal(jax.random.key(seed), (head_dim, n_hashes, max(n_buckets // 2, 1)),
                           jnp.float32)


def lsh_buckets(keys: jax.Array, rotations: jax.Array, n_buckets: int) -> jax.Array:
  """h_r(x) = argmax([x R_r; -x R_r]) for keys [..., T, H] -> buckets [..., R, T] int32."""
  if n_buckets == 1:
    return jnp.zeros(keys.shape[:-2] + (rotations.shape[1], keys.shape[-2]), jnp.int32)
  rot = jnp.einsum('...TH,HRb->...RTb', keys.astype(jnp.float32), rotations)
  return jnp.argmax(jnp.concatenate([rot, -rot], axis=-1), axis=-1).astype(jnp.int32)


def unit_keys(q: jax.Array) -> jax.Array:
  """Shared-QK keys: q / |q| in float32 (any shape, normalised over the last axis)."""
  q = q.astype(jnp.float32)
  return q * jax.lax.rsqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-12)


def _sorted(x: jax.Array, order: jax.Array) -> jax.Array:
  """x [B, N|1, Tp] or [B, N, Tp, H] gathered by every round's order [B, N, R, Tp] ->
  [B, N, R, Tp] or [B, N, R, Tp, H]."""
  if x.ndim == 4:
    return jnp.take_along_axis(x[:, :, None], order[..., None], axis=3)
  return jnp.take_along_axis(x[:, :, None], order, axis=3)


def _chunks(x: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
  """Sorted [B, N, R, Tp, ...] -> (queries [.., Tp/C, C, ...], keys [.., Tp/C, 2C, ...]) where
  the keys of a chunk are the previous chunk followed by the chunk itself."""
  b, n, r, tp = x.shape[:4]
  xq = x.reshape((b, n, r, tp // c, c) + x.shape[4:])
  return xq, jnp.concatenate([jnp.roll(xq, 1, axis=3), xq], axis=4)


def lsh_attention(q: jax.Array, v: jax.Array, mask: AttentionMask | None, *, n_buckets: int,
                  n_hashes: int, chunk_size: int, seed: int = 0, scale: float | None = None,
                  self_mask: bool = True) -> jax.Array:
  """LSH attention of q [B, T, N, H] with values v [B, T, K, H] -> [B, T, N, H] in q.dtype."""
  b, t, n, h = q.shape
  kh = v.shape[2]
  if v.shape[1] != t:
    raise ValueError(f'LSH attention is self-attention: {t} queries but {v.shape[1]} keys')
  query_groups(n, kh)
  mask = AttentionMask() if mask is None else mask
  if mask.extra is not None or mask.window is not None:
    raise ValueError('LSH attention takes segment ids, positions and causality only '
                     '(no extra mask or window)')
  scale = h ** -0.5 if scale is None else scale
  c = min(chunk_size, t)
  tp = -(-t // c) * c
  pad = tp - t

  ones = jnp.ones((b, t), jnp.int32)
  qseg = ones if mask.q_segment_ids is None else jnp.broadcast_to(mask.q_segment_ids, (b, t))
  kseg = ones if mask.kv_segment_ids is None else jnp.broadcast_to(mask.kv_segment_ids, (b, t))
  qpos, kpos = mask.positions(t, t)
  qpos, kpos = jnp.broadcast_to(qpos, (b, t)), jnp.broadcast_to(kpos, (b, t))
  padt = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  qseg, kseg, qpos, kpos = padt(qseg), padt(kseg), padt(qpos), padt(kpos)

  qf = padt(q.astype(jnp.float32)).transpose(0, 2, 1, 3)                       # [B, N, Tp, H]
  vf = padt(jnp.repeat(v, n // kh, axis=2).astype(jnp.float32)).transpose(0, 2, 1, 3)
  keys = unit_keys(qf)
  buckets = lsh_buckets(keys, random_rotations(seed, h, n_hashes, n_buckets), n_buckets)

  # Sort every round by (segment, bucket, index), padding last; rank is the inverse permutation.
  idx = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), buckets.shape)
  seg_key = jnp.where(kseg == 0, jnp.iinfo(jnp.int32).max, kseg)[:, None, None, :]
  _, _, order = jax.lax.sort((jnp.broadcast_to(seg_key, buckets.shape), buckets, idx),
                             dimension=3, num_keys=3)
  rank = jnp.argsort(order, axis=3)
  chunk_of = rank // c                                                          # [B, N, R, Tp]

  sq, _ = _chunks(_sorted(qf, order), c)
  _, sk = _chunks(_sorted(keys, order), c)
  _, sv = _chunks(_sorted(vf, order), c)
  (qi, ki), (qb, kb) = _chunks(order, c), _chunks(jnp.take_along_axis(buckets, order, 3), c)
  per_token = lambda x: _chunks(_sorted(x[:, None], order), c)
  (qs, _), (_, ks) = per_token(qseg), per_token(kseg)
  (qp, _), (_, kp) = per_token(qpos), per_token(kpos)

  e = lambda x: x[..., :, None]  # query side [.., C] -> [.., C, 1]
  f = lambda x: x[..., None, :]  # key side [.., 2C] -> [.., 1, 2C]
  nc = tp // c
  not_wrapped = jnp.concatenate([jnp.broadcast_to((jnp.arange(nc) > 0)[:, None], (nc, c)),
                                 jnp.ones((nc, c), bool)], axis=1)             # [nc, 2C]
  allowed = ((e(qb) == f(kb)) & not_wrapped[:, None, :] & (e(qs) == f(ks)) & (e(qs) != 0)
             & (f(ks) != 0))
  if mask.causal:
    allowed &= f(kp) <= e(qp)

  logits = scale * jnp.einsum('BNRXCH,BNRXSH->BNRXCS', sq, sk)
  if self_mask:
    logits = jnp.where(e(qi) == f(ki), SELF_LOGIT, logits)
  if n_hashes > 1:
    logits -= jnp.log(_duplicates(buckets, chunk_of, order, c).astype(jnp.float32))
  logits = jnp.where(allowed, logits, MASKED_LOGIT)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  w = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  total = jnp.sum(w, axis=-1, keepdims=True)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  out = jnp.einsum('BNRXCS,BNRXSH->BNRXCH', w / total, sv).reshape(b, n, n_hashes, tp, h)
  lse = jnp.where(seen, m + jnp.log(total), MASKED_LOGIT).reshape(b, n, n_hashes, tp)

  # Back to token order, then weight the rounds by softmax over their log-sum-exps.
  out = jnp.take_along_axis(out, rank[..., None], axis=3)
  lse = jnp.take_along_axis(lse, rank, axis=3)
  out = jnp.sum(jax.nn.softmax(lse, axis=2)[..., None] * out, axis=2)           # [B, N, Tp, H]
  return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def _duplicates(buckets, chunk_of, order, c):
  """N_ij = |{r' : h_r'(j) = h_r'(i), c_r'(j) in {c_r'(i) - 1, c_r'(i)}}| for the pairs of every
  round's chunks, [B, N, R, Tp/C, C, 2C] (at least 1 wherever j is in P_r(i))."""
  count = 0
  for r in range(buckets.shape[2]):
    (qb, kb) = _chunks(_sorted(buckets[:, :, r], order), c)
    (qc, kc) = _chunks(_sorted(chunk_of[:, :, r], order), c)
    d = qc[..., :, None] - kc[..., None, :]
    count = count + ((qb[..., :, None] == kb[..., None, :]) & ((d == 0) | (d == 1)))
  return jnp.maximum(count, 1)


@registry.register('lsh', 'xla', unsupported={
    'decode': 'buckets and sorted chunks are computed over the whole sequence, and a new token '
              'can move the chunk boundaries of earlier ones; decode with full attention',
    'cross': 'shared-QK attention: the keys are the queries of the same sequence',
    'bias': 'an additive [T, S] bias would have to be gathered per sorted chunk (not implemented)',
    'window': 'the attended keys are chosen by hashing, not by a position window',
    'dropout': 'attention-probability dropout is not implemented for LSH attention',
    'weights': 'there is no dense probability matrix to return',
    'softcap': 'logit soft-capping is not implemented for LSH attention',
    'shaw': 'relative value terms need the dense probability matrix'})
class LSHAttention(nnx.Module):
  """Reformer LSH self-attention core (see the module docstring); ignores the projected k."""

  features = frozenset({'causal', 'padding', 'segments'})
  subquadratic = True
  # The generic gradient-causality test needs d out_t / d x_s > 0 for every s <= t at T = 8:
  # Generic tests (T = 8): two buckets, two rounds and the self-mask are active; one chunk of 8
  # keeps causal layers strictly causal (with several chunks, later tokens can shift which
  # earlier keys share a chunk; see the module docstring). Multi-chunk sorting is tested
  # against dense oracles in tests/attention/test_lsh.py.
  example_options = {'n_buckets': 2, 'n_hashes': 2, 'chunk_size': 8, 'self_mask': True}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    del num_heads, num_kv_heads, dtype, param_dtype, rngs, unused  # no parameters
    opts = registry.options(cfg, DEFAULTS)
    for name in ('n_buckets', 'n_hashes', 'chunk_size'):
      if not isinstance(opts[name], int) or opts[name] < 1:
        fail(f'model.attention.options.{name}', opts[name], 'must be a positive integer')
    if opts['n_buckets'] != 1 and opts['n_buckets'] % 2:
      fail('model.attention.options.n_buckets', opts['n_buckets'],
           'must be 1 or even (h(x) = argmax([xR; -xR]) makes pairs of buckets)')
    if not isinstance(opts['seed'], int):
      fail('model.attention.options.seed', opts['seed'], 'must be an integer')
    if not isinstance(opts['self_mask'], bool):
      fail('model.attention.options.self_mask', opts['self_mask'], 'must be a bool')
    self.n_buckets, self.n_hashes = opts['n_buckets'], opts['n_hashes']
    self.chunk_size, self.seed = opts['chunk_size'], opts['seed']
    self.self_mask = opts['self_mask']
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, state=None, **unused):
    del k, deterministic, dropout_rng  # shared-QK; no dropout
    if bias is not None or state is not None:
      raise ValueError('LSH attention takes no additive bias and keeps no decoding state')
    return lsh_attention(q, v, mask, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
                         chunk_size=self.chunk_size, seed=self.seed, scale=self.scale,
                         self_mask=self.self_mask)
