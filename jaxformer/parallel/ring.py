"""Ring attention over the 'context' mesh axis (Liu et al. 2023, "Ring Attention with Blockwise
Transformers"; catalog A9), with zig-zag load balancing for causal masks.

Shapes (per device, inside `shard_map`): B batch, T local length (two chunks of c = T / 2
tokens), N query heads, K kv heads, G = N / K, H head dim.

The sequence of length L is cut into 2C chunks of c = L / 2C tokens, C the size of the context
axis. Device d keeps two chunks of queries for the whole call; the keys and values (with their
segment ids and positions) travel around the ring: at step r = 0 .. R-1 device d holds the K/V
chunks of device (d - r) mod C and passes them on with `jax.lax.ppermute`. Each query half
keeps an online softmax in float32 (Milakov & Gimelshein 2018; FlashAttention):

    m' = max(m, max_s z_s),   l' = l e^(m - m') + sum_s e^(z_s - m'),
    o' = o e^(m - m') + sum_s e^(z_s - m') v_s,       out = o / l,   lse = m + log l,

with z = cap(scale q.k) and masked keys contributing 0. A query that sees no key returns 0, as
in the reference core. The backward pass (a `jax.custom_vjp`) is a second ring: q, dO, lse and
D = rowsum(dO * O) stay put, while K, V and their gradient accumulators dK, dV travel; each block
recomputes P = exp(z - lse) and adds

    dV += P^T dO,   dS = P (dO V^T - D),   dQ += scale dS' K,   dK += scale dS'^T Q

(dS' = dS (1 - (z / cap)^2) with soft-capping). After the last step one more ppermute brings each
dK, dV home. GQA reads each kv head once: queries are reshaped to [B, T, K, G, H].

Block skipping and load balancing: which (query chunk, key chunk) blocks can hold a visible pair
is a static function of the chunk indices, computed here in plain Python (`schedule`): causal
masks hide key chunks after the query chunk, a sliding window hides chunks more than `window`
tokens away. A skipped block is not computed (`lax.cond` on the device's row of the table), and
ring steps after the last one any device needs are not run (a causal window in contiguous order
stops after the few devices its band reaches back to). This assumes what the models and
loaders produce: within a segment, positions are the token index plus a constant (`arange`, or
reset per packed segment). The mask of a computed block is always evaluated exactly from segment
ids and positions. With a causal mask and contiguous chunks, device C-1 would do C times the
work of device 0; in zig-zag order (Brandon et al. 2023, "Striped Attention"; the zig-zag of
Megatron-LM's context parallelism) device d holds chunks d and 2C-1-d, so at every step after
the first each device computes exactly two of its four blocks; `schedule` picks zig-zag or
contiguous order by the busiest device's block count, then the number of ring steps. `to_zigzag` / `from_zigzag` move
the contiguous shards into that order and back with two ppermutes of half a shard each.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Same finite stand-in for -inf as the reference core (jaxformer.attention.core.MASKED_LOGIT).
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------- schedule (plain Python)
def chunk_ids(size: int, zigzag: bool) -> np.ndarray:
  """[C, 2]: the global chunk index of each device's two local chunks."""
  d = np.arange(size)
  return np.stack([d, 2 * size - 1 - d] if zigzag else [2 * d, 2 * d + 1], axis=1)


def block_visible(i: int, j: int, chunk: int, causal: bool, window: int | None) -> bool:
  """Whether query chunk i may see anything of key chunk j (chunks of `chunk` tokens)."""
  if causal and j > i:
    return False
  if window is not None and i != j:
    gap = (abs(i - j) - 1) * chunk + 1  # the smallest |t - s| between the two chunks
    if gap >= window:
      return False
  return True


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Which blocks each device computes: `visible[d, r, a, b]` for query half a of device d and
  key half b of the K/V it holds at ring step r (those of device (d - r) mod C)."""
  size: int
  chunk: int
  zigzag: bool
  visible: np.ndarray  # [C, R, 2, 2] bool

  @property
  def steps(self) -> int:
    return self.visible.shape[1]

  def blocks_per_device(self) -> np.ndarray:
    """[C]: how many blocks of c x c (query, key) pairs each device computes."""
    return self.visible.sum(axis=(1, 2, 3))


def schedule(size: int, length: int, *, causal: bool, window: int | None = None,
             zigzag: bool | None = None) -> Schedule:
  """The block schedule of a sequence of `length` tokens on a ring of `size` devices.

  `zigzag=None` picks the order with the shorter critical path: the fewest blocks on the
  busiest device, then the fewest ring steps. That is zig-zag for a causal mask (2C + 1 blocks
  on every device against 4C - 1 on the last one in contiguous order) and contiguous order for a
  causal sliding window shorter than the sequence (the band reaches a few devices back, so the
  ring stops after a few steps, where zig-zag's second chunk needs the K/V of the next device,
  C - 1 steps away). Without a causal mask both orders do the same work.
  """
  if length % (2 * size):
    raise ValueError(f'ring attention over {size} devices needs a length divisible by '
                     f'2 x {size} = {2 * size}, got {length}')
  if zigzag is None:
    cost = lambda s: (int(s.blocks_per_device().max()), s.steps)  # noqa: E731
    return min((schedule(size, length, causal=causal, window=window, zigzag=z)
                for z in (False, True)), key=cost)
  chunk = length // (2 * size)
  ids = chunk_ids(size, zigzag)
  visible = np.zeros((size, size, 2, 2), bool)
  for d in range(size):
    for r in range(size):
      s = (d - r) % size
      for a in range(2):
        for b in range(2):
          visible[d, r, a, b] = block_visible(ids[d, a], ids[s, b], chunk, causal, window)
  used = np.flatnonzero(visible.any(axis=(0, 2, 3)))
  steps = int(used[-1]) + 1 if used.size else 1
  return Schedule(size, chunk, zigzag, visible[:, :steps])


# ---------------------------------------------------------------- zig-zag relayout
def _owner(j: int, size: int) -> int:
  return j if j < size else 2 * size - 1 - j


def to_zigzag(x: jax.Array, axis_name: str, size: int, dim: int = 1) -> jax.Array:
  """Local contiguous shard (chunks 2d, 2d+1) -> zig-zag shard (chunks d, 2C-1-d).

  Even chunks are first halves and odd chunks second halves; each device receives exactly one
  of each (d and 2C-1-d differ in parity), the even one in front when d is even.
  """
  if size == 1:
    return x
  first, second = jnp.split(x, 2, axis=dim)
  even = jax.lax.ppermute(first, axis_name, [(i, _owner(2 * i, size)) for i in range(size)])
  odd = jax.lax.ppermute(second, axis_name, [(i, _owner(2 * i + 1, size)) for i in range(size)])
  mine_even = jax.lax.axis_index(axis_name) % 2 == 0
  return jnp.concatenate([jnp.where(mine_even, even, odd), jnp.where(mine_even, odd, even)],
                         axis=dim)


def from_zigzag(x: jax.Array, axis_name: str, size: int, dim: int = 1) -> jax.Array:
  """The inverse of `to_zigzag`."""
  if size == 1:
    return x
  first, second = jnp.split(x, 2, axis=dim)
  mine_even = jax.lax.axis_index(axis_name) % 2 == 0
  even, odd = jnp.where(mine_even, first, second), jnp.where(mine_even, second, first)
  even = jax.lax.ppermute(even, axis_name, [(_owner(2 * i, size), i) for i in range(size)])
  odd = jax.lax.ppermute(odd, axis_name, [(_owner(2 * i + 1, size), i) for i in range(size)])
  return jnp.concatenate([even, odd], axis=dim)


# ---------------------------------------------------------------- the ring
@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
  sched: Schedule
  axis_name: str | None
  scale: float
  causal: bool
  window: int | None
  softcap: float | None


def _shift(xs, st: _Static, by: int = 1):
  """Sends each array of `xs` `by` devices along the ring (device d -> d + by)."""
  c = st.sched.size
  if st.axis_name is None or by % c == 0:
    return xs
  perm = [(i, (i + by) % c) for i in range(c)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, st.axis_name, perm), xs)


def _me(st: _Static):
  return 0 if st.axis_name is None else jax.lax.axis_index(st.axis_name)


def _half(x, i: int, c: int):
  return x[:, i * c:(i + 1) * c]


def _logits(q, k, qs, ks, qp, kp, st: _Static):
  """(z [B, K, G, Tq, Sk] float32 after capping, allowed [B, 1, 1, Tq, Sk], tanh or None)."""
  z = jnp.einsum('BTKGH,BSKH->BKGTS', q, k, preferred_element_type=jnp.float32) * st.scale
  t = None
  if st.softcap is not None:
    t = jnp.tanh(z / st.softcap)
    z = st.softcap * t
  allowed = (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0) & (ks[:, None, :] != 0)
  diff = qp[:, :, None] - kp[:, None, :]
  if st.causal:
    allowed &= diff >= 0
  if st.window is not None:
    allowed &= (diff < st.window) if st.causal else (jnp.abs(diff) < st.window)
  return z, allowed[:, None, None], t


def _run(vis, fn, carry, d, r, a, b):
  """`fn(carry)` where block (a, b) of step r is visible on this device (static when uniform)."""
  col = vis[:, r, a, b]
  if not col.any():
    return carry
  if col.all():
    return fn(carry)
  return jax.lax.cond(jnp.asarray(col)[d], fn, lambda c: c, carry)


def _forward(q, k, v, qs, ks, qp, kp, st: _Static):
  b, t, n, h = q.shape
  kh = k.shape[2]
  c = t // 2
  qg = q.reshape(b, t, kh, n // kh, h)
  d = _me(st)
  acc = []
  for a in range(2):
    shape = (b, kh, n // kh, c)
    acc.append((jnp.zeros(shape + (h,), jnp.float32), jnp.full(shape, MASKED_LOGIT, jnp.float32),
                jnp.zeros(shape, jnp.float32)))
  kv = (k, v, ks, kp)
  for r in range(st.sched.steps):
    if r:
      kv = _shift(kv, st)
    k_, v_, ks_, kp_ = kv
    for a in range(2):
      for bb in range(2):
        def block(carry, a=a, bb=bb, k_=k_, v_=v_, ks_=ks_, kp_=kp_):
          o, m, l = carry
          z, allowed, _ = _logits(_half(qg, a, c), _half(k_, bb, c), _half(qs, a, c),
                                  _half(ks_, bb, c), _half(qp, a, c), _half(kp_, bb, c), st)
          z = jnp.where(allowed, z, MASKED_LOGIT)
          m_new = jnp.maximum(m, z.max(-1))
          corr = jnp.exp(m - m_new)
          p = jnp.where(allowed, jnp.exp(z - m_new[..., None]), 0.0)
          o = o * corr[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', p.astype(v_.dtype),
                                               _half(v_, bb, c),
                                               preferred_element_type=jnp.float32)
          return o, m_new, l * corr + p.sum(-1)
        acc[a] = _run(st.sched.visible, block, acc[a], d, r, a, bb)
  outs, lses = [], []
  for o, m, l in acc:
    seen = l > 0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    outs.append(jnp.einsum('BKGTH->BTKGH', o).reshape(b, c, n, h))
    lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0))
  return jnp.concatenate(outs, axis=1).astype(q.dtype), jnp.stack(lses)


def _backward(q, k, v, qs, ks, qp, kp, out, lse, dout, st: _Static):
  b, t, n, h = q.shape
  kh = k.shape[2]
  g, c = n // kh, t // 2
  qg = q.reshape(b, t, kh, g, h)
  dog = dout.reshape(b, t, kh, g, h)
  # D = rowsum(dO * O), per query row.
  delta = (dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).reshape(b, t, kh, g)
  delta = jnp.einsum('BTKG->BKGT', delta)
  d = _me(st)
  dq = [jnp.zeros((b, kh, g, c, h), jnp.float32) for _ in range(2)]
  kv = (k, v, ks, kp)
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for r in range(st.sched.steps):
    if r:
      kv, dkv = _shift((kv, dkv), st)
    k_, v_, ks_, kp_ = kv
    for a in range(2):
      for bb in range(2):
        def block(carry, a=a, bb=bb, k_=k_, v_=v_, ks_=ks_, kp_=kp_):
          dq_a, (dk, dv) = carry
          qa, doa = _half(qg, a, c), _half(dog, a, c)
          kb, vb = _half(k_, bb, c), _half(v_, bb, c)
          z, allowed, tanh = _logits(qa, kb, _half(qs, a, c), _half(ks_, bb, c),
                                     _half(qp, a, c), _half(kp_, bb, c), st)
          p = jnp.where(allowed, jnp.exp(z - lse[a][..., None]), 0.0)
          dv_b = jnp.einsum('BKGTS,BTKGH->BSKH', p.astype(doa.dtype), doa,
                            preferred_element_type=jnp.float32)
          dp = jnp.einsum('BTKGH,BSKH->BKGTS', doa, vb, preferred_element_type=jnp.float32)
          ds = p * (dp - delta[..., a * c:(a + 1) * c, None])
          if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
          ds = ds * st.scale
          dq_a = dq_a + jnp.einsum('BKGTS,BSKH->BKGTH', ds.astype(kb.dtype), kb,
                                   preferred_element_type=jnp.float32)
          dk_b = jnp.einsum('BKGTS,BTKGH->BSKH', ds.astype(qa.dtype), qa,
                            preferred_element_type=jnp.float32)
          sl = slice(bb * c, (bb + 1) * c)
          return dq_a, (dk.at[:, sl].add(dk_b), dv.at[:, sl].add(dv_b))
        dq[a], dkv = _run(st.sched.visible, block, (dq[a], dkv), d, r, a, bb)
  dk, dv = _shift(dkv, st, by=-(st.sched.steps - 1))
  dq = jnp.concatenate([jnp.einsum('BKGTH->BTKGH', x).reshape(b, c, n, h) for x in dq], axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ring(q, k, v, qs, ks, qp, kp, st):
  return _forward(q, k, v, qs, ks, qp, kp, st)[0]


def _ring_fwd(q, k, v, qs, ks, qp, kp, st):
  out, lse = _forward(q, k, v, qs, ks, qp, kp, st)
  return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _ring_bwd(st, res, dout):
  q, k, v, qs, ks, qp, kp, out, lse = res
  dq, dk, dv = _backward(q, k, v, qs, ks, qp, kp, out, lse, dout, st)
  return dq, dk, dv, None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                   sched: Schedule, axis_name: str | None, scale: float, causal: bool,
                   window: int | None = None, logit_softcap: float | None = None) -> jax.Array:
  """Local ring attention inside `shard_map` over `axis_name` (None: one device, no ring).

  q [B, T, N, H], k / v [B, T, K, H], segment ids and positions [B, T] int32, all already in the
  order of `sched` (zig-zag when `sched.zigzag`); returns [B, T, N, H] in the same order.
  """
  if q.shape[1] != 2 * sched.chunk or k.shape[1] != 2 * sched.chunk:
    raise ValueError(f'ring attention: local lengths {q.shape[1]} / {k.shape[1]} do not match '
                     f'the schedule (two chunks of {sched.chunk})')
  st = _Static(sched, axis_name, float(scale), bool(causal), window, logit_softcap)
  return _ring(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, st)
