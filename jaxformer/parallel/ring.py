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
work of device 0; in zig-zag order (as in Megatron-LM's context parallelism; Brandon et al.
2023, "Striped Attention", balance with stripes instead) device d holds chunks d and 2C-1-d, so
at every step after the first each device computes exactly two of its four blocks. `schedule`
picks zig-zag or contiguous order by the busiest device's block count, then the number of ring
steps; `to_zigzag` / `from_zigzag` move the contiguous shards into that order and back with two
ppermutes of half a shard each.

Memory: a block is computed in key tiles of `block_k` (a `fori_loop`), and the ring steps after
the first run in a `fori_loop`, so a device's working set is one tile of scores
[B, N, c, block_k] besides its shards. The custom_vjp sits outside `shard_map` and saves q, k, v,
the mask arrays, the output and the log-sum-exp; `_tie` keeps a scan over layers from hoisting
per-block masks out of its loop.
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


P = jax.sharding.PartitionSpec


# ---------------------------------------------------------------- the ring
@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
  sched: Schedule
  axis_name: str | None
  scale: float
  causal: bool
  window: int | None
  softcap: float | None
  tile: int  # keys per inner tile of a block
  mesh: jax.sharding.Mesh | None = None  # None: called on local arrays, no shard_map
  specs: tuple | None = None  # PartitionSpecs of q / k, of [B, T] arrays and of the lse
  reduce_axes: tuple = ()  # mesh axes over which a shared bias's gradient is summed


def key_tile(chunk: int, block_k: int) -> int:
  """The inner key tile of a chunk: `block_k` when it divides the chunk, else the whole chunk."""
  return block_k if chunk > block_k and chunk % block_k == 0 else chunk


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


def _tile(x, start, size: int):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _block_bias(bias, qp, kp, shape):
  """A `RelativeBias` at one block's global positions, as [B, K, G, Tq, Sk]."""
  return bias(qp, kp).reshape(shape)


def _logits(q, k, qs, ks, qp, kp, st: _Static, bias=None):
  """(z [B, K, G, Tq, Sk] float32 after capping, allowed [B, 1, 1, Tq, Sk], tanh or None)."""
  z = jnp.einsum('BTKGH,BSKH->BKGTS', q, k, preferred_element_type=jnp.float32) * st.scale
  if bias is not None:
    z = z + _block_bias(bias, qp, kp, z.shape)
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


def _run(st: _Static, fn, carry, d, r, a, b):
  """`fn(carry)` where block (a, b) of step r is visible on this device. With a static step r a
  block that every device computes (or none) needs no branch."""
  vis = st.sched.visible
  if isinstance(r, int):
    col = vis[:, r, a, b]
    if not col.any():
      return carry
    if col.all():
      return fn(carry)
    flag = jnp.asarray(col)[d]
  else:
    flag = jnp.asarray(vis[:, :, a, b])[d, r]
  return jax.lax.cond(flag, fn, lambda c: c, carry)


def _ring_loop(step, carry, st: _Static):
  """Runs `step(r, carry)` for r = 0 .. R-1; step 0 unrolled (its blocks are known statically),
  the rest in a loop, so one step's buffers are live at a time."""
  carry = step(0, carry)
  if st.sched.steps > 1:
    carry = jax.lax.fori_loop(1, st.sched.steps, step, carry)
  return carry


def _forward(q, k, v, qs, ks, qp, kp, bias, st: _Static):
  b, t, n, h = q.shape
  kh = k.shape[2]
  g, c, kt = n // kh, t // 2, st.tile
  qg = q.reshape(b, t, kh, g, h)
  d = _me(st)
  # The fill values of masked entries, tied to q (see `_tie`): a literal broadcast to a block's
  # shape would be hoisted out of a scan over layers and stacked over the ring steps.
  zero, = _tie(q, jnp.zeros((), jnp.float32))
  masked = zero + MASKED_LOGIT
  shape = (b, kh, g, c)
  acc = tuple((jnp.zeros(shape + (h,), jnp.float32), jnp.full(shape, MASKED_LOGIT, jnp.float32),
               jnp.zeros(shape, jnp.float32)) for _ in range(2))

  def tiles(a, bb, kv, carry):
    k_, v_, ks_, kp_ = kv
    qa, qsa, qpa = _half(qg, a, c), _half(qs, a, c), _half(qp, a, c)

    def tile(i, carry):
      o, m, l = carry
      s0 = bb * c + i * kt
      z, allowed, _ = _logits(qa, _tile(k_, s0, kt), qsa, _tile(ks_, s0, kt), qpa,
                              _tile(kp_, s0, kt), st, bias)
      z = jnp.where(allowed, z, masked)
      m_new = jnp.maximum(m, z.max(-1))
      corr = jnp.exp(m - m_new)
      p = jnp.where(allowed, jnp.exp(z - m_new[..., None]), zero)
      o = o * corr[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', p.astype(v_.dtype),
                                           _tile(v_, s0, kt), preferred_element_type=jnp.float32)
      return o, m_new, l * corr + p.sum(-1)

    return jax.lax.fori_loop(0, c // kt, tile, carry)

  def step(r, carry):
    kv, acc = carry
    if not isinstance(r, int) or r:
      kv = _shift(kv, st)
    acc = list(acc)
    for a in range(2):
      for bb in range(2):
        acc[a] = _run(st, functools.partial(tiles, a, bb, kv), acc[a], d, r, a, bb)
    return kv, tuple(acc)

  _, acc = _ring_loop(step, ((k, v, ks, kp), acc), st)
  outs, lses = [], []
  for o, m, l in acc:
    seen = l > 0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    outs.append(jnp.einsum('BKGTH->BTKGH', o).reshape(b, c, n, h))
    lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0))
  return jnp.concatenate(outs, axis=1).astype(q.dtype), jnp.stack(lses)


def _backward(q, k, v, qs, ks, qp, kp, bias, out, lse, dout, st: _Static):
  b, t, n, h = q.shape
  kh = k.shape[2]
  g, c, kt = n // kh, t // 2, st.tile
  qg = q.reshape(b, t, kh, g, h)
  dog = dout.reshape(b, t, kh, g, h)
  # D = rowsum(dO * O), per query row.
  delta = (dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).reshape(b, t, kh, g)
  delta = jnp.einsum('BTKG->BKGT', delta)
  d = _me(st)
  zero, = _tie(dout, jnp.zeros((), jnp.float32))
  dq = tuple(jnp.zeros((b, kh, g, c, h), jnp.float32) for _ in range(2))
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dbias = jax.tree.map(jnp.zeros_like, bias)

  def tiles(a, bb, kv, carry):
    k_, v_, ks_, kp_ = kv
    qa, doa = _half(qg, a, c), _half(dog, a, c)
    qsa, qpa, lse_a = _half(qs, a, c), _half(qp, a, c), lse[a][..., None]
    delta_a = delta[..., a * c:(a + 1) * c, None]

    def tile(i, carry):
      dq_a, (dk, dv), dbias = carry
      s0 = bb * c + i * kt
      kb, vb = _tile(k_, s0, kt), _tile(v_, s0, kt)
      kpb = _tile(kp_, s0, kt)
      z, allowed, tanh = _logits(qa, kb, qsa, _tile(ks_, s0, kt), qpa, kpb, st, bias)
      p = jnp.where(allowed, jnp.exp(z - lse_a), zero)
      dv_t = jnp.einsum('BKGTS,BTKGH->BSKH', p.astype(doa.dtype), doa,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum('BTKGH,BSKH->BKGTS', doa, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_a)
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      if bias is not None:  # ds is now d loss / d (scaled logits + bias)
        _, bias_vjp = jax.vjp(lambda bs: _block_bias(bs, qpa, kpb, ds.shape), bias)
        dbias = jax.tree.map(jnp.add, dbias, bias_vjp(ds)[0])
      ds = ds * st.scale
      dq_a = dq_a + jnp.einsum('BKGTS,BSKH->BKGTH', ds.astype(kb.dtype), kb,
                               preferred_element_type=jnp.float32)
      dk_t = jnp.einsum('BKGTS,BTKGH->BSKH', ds.astype(qa.dtype), qa,
                        preferred_element_type=jnp.float32)
      add = lambda x, y: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
          x, _tile(x, s0, kt) + y, s0, axis=1)
      return dq_a, (add(dk, dk_t), add(dv, dv_t)), dbias

    return jax.lax.fori_loop(0, c // kt, tile, carry)

  def step(r, carry):
    kv, dkv, dq, dbias = carry
    if not isinstance(r, int) or r:
      kv, dkv = _shift((kv, dkv), st)
    dq = list(dq)
    for a in range(2):
      for bb in range(2):
        dq[a], dkv, dbias = _run(st, functools.partial(tiles, a, bb, kv), (dq[a], dkv, dbias),
                                 d, r, a, bb)
    return kv, dkv, tuple(dq), dbias

  _, dkv, dq, dbias = _ring_loop(step, ((k, v, ks, kp), dkv, dq, dbias), st)
  dk, dv = _shift(dkv, st, by=-(st.sched.steps - 1))
  dq = jnp.concatenate([jnp.einsum('BKGTH->BTKGH', x).reshape(b, c, n, h) for x in dq], axis=1)
  if st.reduce_axes and bias is not None:  # the bias is shared: its gradient sums every device's blocks and rows
    dbias = jax.lax.psum(dbias, st.reduce_axes)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def _tie(anchor, *xs):
  """`xs`, each plus 0 x one element of `anchor`: the same values, now depending on `anchor`.

  Inside a `lax.scan` over layers the mask arrays (and in tests K/V) are loop constants, and
  JAX's partial evaluation hoists everything computed from constants alone out of the loop: the
  masks and key tiles of every block of every ring step, stacked (4.2 GiB per device at L = 32k
  on cp8, against 0.1 GiB tied to the queries or the cotangent, which vary per layer).
  """
  zero = anchor.reshape(-1)[0].astype(jnp.float32) * 0.0
  return tuple(x + zero.astype(x.dtype) for x in xs)


def _forward_local(st: _Static, q, k, v, qs, ks, qp, kp, bias):
  """Contiguous local shards in, (out in contiguous order, lse in schedule order) out."""
  k, v, qs, ks, qp, kp = _tie(q, k, v, qs, ks, qp, kp)
  bias = jax.tree.map(lambda x: _tie(q, x)[0], bias)
  if st.sched.zigzag:
    q, k, v, qs, ks, qp, kp = (to_zigzag(x, st.axis_name, st.sched.size)
                               for x in (q, k, v, qs, ks, qp, kp))
  out, lse = _forward(q, k, v, qs, ks, qp, kp, bias, st)
  if st.sched.zigzag:
    out = from_zigzag(out, st.axis_name, st.sched.size)
  return out, lse


def _backward_local(st: _Static, q, k, v, qs, ks, qp, kp, bias, out, lse, dout):
  q, k, v, qs, ks, qp, kp, out, lse = _tie(dout, q, k, v, qs, ks, qp, kp, out, lse)
  bias = jax.tree.map(lambda x: _tie(dout, x)[0], bias)
  if st.sched.zigzag:
    q, k, v, qs, ks, qp, kp, out, dout = (to_zigzag(x, st.axis_name, st.sched.size)
                                          for x in (q, k, v, qs, ks, qp, kp, out, dout))
  *grads, dbias = _backward(q, k, v, qs, ks, qp, kp, bias, out, lse, dout, st)
  if st.sched.zigzag:
    grads = [from_zigzag(g, st.axis_name, st.sched.size) for g in grads]
  return (*grads, dbias)


def _call(st: _Static, fn, in_specs, out_specs, *args):
  if st.mesh is None:
    return fn(*args)
  return jax.shard_map(fn, mesh=st.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def bias_specs(bias, heads):
  """PartitionSpecs of a RelativeBias under shard_map: its leaves have the heads last, split
  like the heads of q (`heads`: q's head entry), the rest whole."""
  return jax.tree.map(lambda x: P(*([None] * (x.ndim - 1)), heads), bias)


def _bias_specs(st: _Static, bias):
  return bias_specs(bias, st.specs[0][2] if st.specs else None)


# The custom_vjp sits outside `shard_map`; its residuals are q, k, v, the mask arrays, the
# relative bias, out and the log-sum-exp.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st, q, k, v, qs, ks, qp, kp, bias):
  return _ring_fwd(st, q, k, v, qs, ks, qp, kp, bias)[0]


def _ring_fwd(st, q, k, v, qs, ks, qp, kp, bias):
  spec = st.specs or (None,) * 3
  out, lse = _call(st, functools.partial(_forward_local, st),
                   (spec[0],) * 3 + (spec[1],) * 4 + (_bias_specs(st, bias),),
                   (spec[0], spec[2]), q, k, v, qs, ks, qp, kp, bias)
  return out, (q, k, v, qs, ks, qp, kp, bias, out, lse)


def _ring_bwd(st, res, dout):
  spec = st.specs or (None,) * 3
  bspec = _bias_specs(st, res[7])
  dq, dk, dv, dbias = _call(
      st, functools.partial(_backward_local, st),
      (spec[0],) * 3 + (spec[1],) * 4 + (bspec, spec[0], spec[2], spec[0]),
      (spec[0],) * 3 + (bspec,), *res, dout)
  return dq, dk, dv, None, None, None, None, dbias


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
                   sched: Schedule, scale: float, causal: bool, window: int | None = None,
                   logit_softcap: float | None = None, block_k: int = 512, bias=None,
                   mesh: jax.sharding.Mesh | None = None, axis_name: str | None = None,
                   qkv_spec=None, mask_spec=None) -> jax.Array:
  """Ring attention of q [B, L, N, H] over k / v [B, L, K, H] -> [B, L, N, H].

  Segment ids and positions are [B, L] int32. With `mesh`, the arrays are global and the ring
  runs under `jax.shard_map` over `axis_name` with `qkv_spec` ([B, L, heads, H] arrays, the
  length on `axis_name`) and `mask_spec` ([B, L] arrays); without, they are one device's and
  there is no ring (`sched.size` 1). Tokens are in natural order; the zig-zag order of
  `sched` is applied and undone inside. Each block is computed in key tiles of `block_k`
  (`key_tile`), so a device's working set is [B, N, c, block_k] scores, not [B, N, c, c].
  `bias`, a `layers.positions.RelativeBias` (ALiBi, T5), is evaluated per tile at the tile's
  global positions; its gradient (T5's table) sums the blocks of every device.
  """
  if q.shape[1] != k.shape[1] or q.shape[1] != 2 * sched.chunk * sched.size:
    raise ValueError(f'ring attention: lengths {q.shape[1]} / {k.shape[1]} do not match the '
                     f'schedule ({2 * sched.size} chunks of {sched.chunk})')
  specs, reduce_axes = None, ()
  if mesh is not None:
    b, _, h, _ = qkv_spec
    specs = (qkv_spec, mask_spec, jax.sharding.PartitionSpec(None, b, h, None, axis_name))
    batch = () if b is None else (b,) if isinstance(b, str) else tuple(b)
    reduce_axes = batch + (axis_name,)
  st = _Static(sched, axis_name if mesh is not None else None, float(scale), bool(causal),
               window, logit_softcap, key_tile(sched.chunk, block_k), mesh, specs, reduce_axes)
  return _ring(st, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, bias)
