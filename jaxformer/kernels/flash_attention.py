"""Flash attention (Dao et al. 2022; FlashAttention-2, Dao 2023) as Pallas kernels, catalog row A8.

    Z = s Q K^T + bias,  Z' = c tanh(Z / c) (optional soft cap),  P = softmax(Z' masked),  O = P V

Tiled: a block of queries visits the key blocks one at a time and keeps the running row maximum
m, normaliser l and unnormalised output acc (online softmax), so no [T, S] matrix exists; the
forward keeps only O and the row logsumexp L = m + log l. The backward recomputes
P = exp(Z' - L) block by block:

    dV = P^T dO,   dP = dO V^T,   dZ' = P (dP - delta),   delta = rowsum(dO * O),
    dZ = dZ' (1 - tanh^2(Z / c)) with the cap,   dQ = s dZ K,   dK = s dZ^T Q

in one kernel for dK, dV (a key block visits the query blocks of all G query heads that read
its kv head, so GQA never repeats K/V, not even in the gradient) and one for dQ, which also
writes d bias = dZ block by block when a bias is given (T5's learned relative bias needs it; the
bias itself is an [B|1, N|1, T, S] input, read tile by tile).

Masks follow `jaxformer.attention.mask.AttentionMask`: allowed = q_seg == kv_seg != 0, causal
kv_pos <= q_pos, window |q_pos - kv_pos| < w (one-sided when causal). Per-block minima and
maxima of ids and positions (tiny arrays computed outside the kernels) give every query block
the range [lo, hi] of key blocks that may hold a visible key, and a flag per block pair; blocks
that are provably fully masked are skipped. That is exact for any positions (nothing assumes
position == index), and yields the causal, sliding-window and packed-sequence savings.
A query row that sees no key returns 0 with zero gradients, like the dense core.

Two schedules share the block maths:
  * 'gpu' (Triton lowering): grid (B, N, query blocks); the key loop is a `fori_loop` over
    [lo, hi] inside the kernel, K/V of one head resident in global memory.
  * 'tpu' (Mosaic): grid (B, N, query blocks, key blocks) with the key axis sequential
    ('arbitrary'), m, l, acc in VMEM scratch, ranges and flags as scalar-prefetch operands in
    SMEM; the key-block index map is clamped to [lo, hi] so skipped blocks are never copied.
On CPU either runs in Pallas interpret mode, which is how CI tests both.

Lengths that are not block multiples are padded with segment id 0 (padding) and cut off; head
dims are zero-padded to a power of two >= 16 (zero columns change neither Q K^T nor P V). Inputs
may be fp32, bf16 or fp16: Z, P, m, l and every accumulator are fp32, and P / dZ are cast to
the input dtype only as operands of the second matmul of each pair, as in FlashAttention.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
q [B, T, N, H], k / v [B, S, K, H]; query head n reads kv head n // G (Hugging Face's repeat_kv).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.attention.core import MASKED_LOGIT, dot_product_attention, query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.kernels import compat
from jaxformer.kernels.compat import pl

SCHEDULES = ('gpu', 'tpu')
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query / key tile sizes of the forward and the backward kernels (powers of two)."""
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64

  @classmethod
  def default(cls, schedule: str) -> 'BlockSizes':
    # Triton keeps a [block_q, block_k] fp32 tile in registers: 128 x 64 fits 4-8 warps.
    # Mosaic TPU wants lane-dense 128-multiples and amortises the per-grid-step overhead.
    return cls() if schedule == 'gpu' else cls(128, 128, 128, 128)

  def check(self) -> None:
    for name, val in dataclasses.asdict(self).items():
      if val < 8 or val & (val - 1):
        raise ValueError(f'BlockSizes.{name}={val} must be a power of two >= 8')


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  window: int | None
  scale: float
  softcap: float | None
  bq: int
  bk: int
  bqb: int
  bkb: int
  groups: int
  schedule: str
  interpret: bool
  bias_batch: bool | None = None  # None: no bias; else whether it varies over batch
  bias_heads: bool = False        # whether it varies over heads

  @property
  def has_bias(self) -> bool:
    return self.bias_batch is not None

  def bias_index(self, b, n):
    """Batch and head index into the [B|1, N|1, ...] bias."""
    return (b if self.bias_batch else 0), (n if self.bias_heads else 0)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                    causal: bool = False, window: int | None = None, scale: float | None = None,
                    logit_softcap: float | None = None, bias: jax.Array | None = None,
                    block_sizes: BlockSizes | None = None, schedule: str | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Exact softmax attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H].

  Args:
    q_segment_ids, kv_segment_ids: [B, T] / [B, S] int, 0 = padding; default all 1.
    q_positions, kv_positions: [B|1, T] / [B|1, S] int for causal / window; default arange.
    causal, window: the masks of `AttentionMask` (window one-sided when causal).
    scale: multiplies q.k, default H ** -0.5; logit_softcap: c of c tanh(z / c), or None.
    bias: additive float bias [B|1, N|1, T, S] (before the soft cap), differentiable.
    block_sizes: tiles; default `BlockSizes.default(schedule)`, capped at the padded lengths.
    schedule: 'gpu' or 'tpu'; default the TPU schedule on TPU, otherwise the GPU one.
    interpret: run in Pallas interpret mode; default True unless the backend is GPU or TPU.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if k.shape != (b, s, kh, h) or v.shape != k.shape:
    raise ValueError(f'flash_attention needs k, v of shape [B, S, K, {h}] matching q {q.shape}; '
                     f'got k {k.shape}, v {v.shape}')
  query_groups(n, kh)
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
  if window is not None and window < 1:
    raise ValueError(f'window must be >= 1, got {window}')
  if bias is not None and (bias.ndim != 4 or bias.shape[0] not in (1, b)
                           or bias.shape[1] not in (1, n) or bias.shape[2:] != (t, s)):
    raise ValueError(f'bias must have shape [B|1, N|1, T, S] = [{b}|1, {n}|1, {t}, {s}], '
                     f'got {bias.shape}')
  platform = _platform()
  schedule = schedule or ('tpu' if platform == 'tpu' else 'gpu')
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule={schedule!r} is invalid: allowed values are {list(SCHEDULES)}')
  interpret = platform not in ('gpu', 'tpu') if interpret is None else interpret
  if not interpret and schedule != platform:
    raise ValueError(f"the {schedule!r} schedule cannot be compiled for backend {platform!r}; "
                     'use interpret=True or the schedule of this backend')
  blocks = block_sizes or BlockSizes.default(schedule)
  blocks.check()
  fit = lambda blk, length: min(blk, max(16, pl.next_power_of_2(length)))
  bq, bqb = fit(blocks.block_q, t), fit(blocks.block_q_bwd, t)
  bk, bkb = fit(blocks.block_k, s), fit(blocks.block_k_bwd, s)
  tp, sp = _round_up(t, max(bq, bqb)), _round_up(s, max(bk, bkb))
  hp = max(16, pl.next_power_of_2(h))
  st = _Static(causal=bool(causal), window=window, scale=h ** -0.5 if scale is None else scale,
               softcap=logit_softcap, bq=bq, bk=bk, bqb=bqb, bkb=bkb, groups=n // kh,
               schedule=schedule, interpret=bool(interpret),
               bias_batch=None if bias is None else bias.shape[0] > 1,
               bias_heads=bias is not None and bias.shape[1] > 1)

  def ids(seg, length, padded):
    seg = jnp.ones((b, length), jnp.int32) if seg is None else seg.astype(jnp.int32)
    return jnp.pad(jnp.broadcast_to(seg, (b, length)), ((0, 0), (0, padded - length)))

  def pos(p, length, padded):
    p = jnp.arange(length, dtype=jnp.int32)[None] if p is None else p.astype(jnp.int32)
    return jnp.pad(jnp.broadcast_to(p, (b, length)), ((0, 0), (0, padded - length)))

  side = (ids(q_segment_ids, t, tp), ids(kv_segment_ids, s, sp), pos(q_positions, t, tp),
          pos(kv_positions, s, sp))
  heads_first = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0),
                                              (0, hp - h))).transpose(0, 2, 1, 3)
  if bias is not None:
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)))
  out = _flash(st, heads_first(q, tp), heads_first(k, sp), heads_first(v, sp), bias, side)
  return out.transpose(0, 2, 1, 3)[:, :t, :, :h]


def _platform() -> str:
  return jax.default_backend()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# ----------------------------------------------------------------------------- block maths

def _allowed(qseg, qpos, kseg, kpos, st: _Static):
  """[bq, 1] ids/positions of queries, [1, bk] of keys -> [bq, bk] bool."""
  m = (qseg == kseg) & (qseg != 0)
  diff = qpos - kpos
  if st.causal:
    m = m & (diff >= 0)
  if st.window is not None:
    m = m & ((diff < st.window) if st.causal else (jnp.abs(diff) < st.window))
  return m


def _dot(a, b, trans_b: bool = False):
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _logits(q, k, bias, st: _Static):
  """Z' [bq, bk] (fp32) and tanh(Z / c) (or None) for the soft-cap derivative."""
  z = _dot(q, k, trans_b=True) * st.scale
  if bias is not None:
    z = z + bias.astype(_F32)
  if st.softcap is None:
    return z, None
  th = jnp.tanh(z / st.softcap)
  return st.softcap * th, th


def _fwd_step(q, k, v, bias, allowed, carry, st: _Static):
  m, l, acc = carry  # [bq, 1], [bq, 1], [bq, H]
  z, _ = _logits(q, k, bias, st)
  z = jnp.where(allowed, z, MASKED_LOGIT)
  m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(allowed, jnp.exp(z - m_new), 0.0)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v)
  return m_new, l, acc


def _finish(m, l, acc, dtype):
  seen = l > 0
  out = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0).astype(dtype)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASKED_LOGIT)
  return out, lse


def _grad_logits(q, k, v, bias, do, lse, delta, allowed, st: _Static):
  """dZ [bq, bk] (fp32; = d bias, and s dZ = d(Q K^T)) and P [bq, bk] of one block pair."""
  z, th = _logits(q, k, bias, st)
  p = jnp.where(allowed, jnp.exp(z - lse), 0.0)
  dz = p * (_dot(do, v, trans_b=True) - delta)
  if th is not None:
    dz = dz * (1.0 - th * th)
  return dz, p


def _init(rows: int, cols: int):
  return (jnp.full((rows, 1), MASKED_LOGIT, _F32), jnp.zeros((rows, 1), _F32),
          jnp.zeros((rows, cols), _F32))


# ----------------------------------------------------------------------------- block ranges

def _block_stats(seg, pos, blk: int):
  """Per block of `blk` entries of seg, pos [B, L]: (any valid, (min, max) id, (min, max) pos)."""
  b, length = seg.shape
  valid = (seg != 0).reshape(b, length // blk, blk)
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min

  def min_max(x):
    x = x.reshape(valid.shape)
    return jnp.where(valid, x, big).min(-1), jnp.where(valid, x, small).max(-1)

  return valid.any(-1), min_max(seg), min_max(pos)


def _visible(side, bq: int, bk: int, st: _Static):
  """[B, nq, nk] bool: False only where every (query, key) pair of the two blocks is masked."""
  qseg, kseg, qpos, kpos = side
  (qa, (qs0, qs1), (qp0, qp1)) = jax.tree.map(lambda x: x[:, :, None],
                                              _block_stats(qseg, qpos, bq))
  (ka, (ks0, ks1), (kp0, kp1)) = jax.tree.map(lambda x: x[:, None, :],
                                              _block_stats(kseg, kpos, bk))
  vis = qa & ka & (ks0 <= qs1) & (ks1 >= qs0)
  if st.causal:
    vis = vis & (kp0 <= qp1)
  if st.window is not None:
    vis = vis & (qp0 - kp1 < st.window)
    if not st.causal:
      vis = vis & (kp0 - qp1 < st.window)
  return vis


def _ranges(vis):
  """First / last visible key block per query block ([B, nq] int32; hi < lo when none)."""
  nk = vis.shape[-1]
  idx = jnp.arange(nk, dtype=jnp.int32)
  return (jnp.where(vis, idx, nk).min(-1).astype(jnp.int32),
          jnp.where(vis, idx, -1).max(-1).astype(jnp.int32))


def _pad_pow2(x, axes):
  """Triton block shapes must be powers of two: pads the small range arrays with zeros."""
  pads = [(0, pl.next_power_of_2(d) - d if a in axes else 0) for a, d in enumerate(x.shape)]
  return jnp.pad(x, pads)


# ----------------------------------------------------------------------------- custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, bias, side):
  return _forward(st, q, k, v, bias, side)[0]


def _flash_fwd(st, q, k, v, bias, side):
  out, lse = _forward(st, q, k, v, bias, side)
  return out, (q, k, v, bias, side, out, lse)


def _flash_bwd(st, res, do):
  q, k, v, bias, side, out, lse = res
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
  vis = _visible(side, st.bqb, st.bkb, st)  # one map of visible block pairs for both kernels
  dq, dbias = _backward_dq(st, q, k, v, bias, side, vis, do, lse, delta)
  dk, dv = _backward_dkv(st, q, k, v, bias, side, vis, do, lse, delta)
  if bias is not None:
    axes = tuple(a for a, varies in ((0, st.bias_batch), (1, st.bias_heads)) if not varies)
    dbias = jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _int_views(side):
  """Query ids/positions as [B, T, 1] columns, key ones as [B, 1, S] rows."""
  qseg, kseg, qpos, kpos = side
  return qseg[:, :, None], kseg[:, None, :], qpos[:, :, None], kpos[:, None, :]


def _call(st: _Static, kernel, *, head_dim: int | None = None, **kwargs):
  if st.schedule == 'gpu' and not st.interpret:
    kwargs['compiler_params'] = compat.gpu_compiler_params(
        num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  elif st.schedule == 'tpu' and not st.interpret:
    kwargs['compiler_params'] = compat.tpu_compiler_params(
        dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary'))
  return pl.pallas_call(kernel, interpret=st.interpret, **kwargs)


def _gpu_ranges(vis):
  """(lo, hi, flags) for the GPU kernels, padded to power-of-two shapes for Triton."""
  lo, hi = _ranges(vis)
  return _pad_pow2(lo, {1}), _pad_pow2(hi, {1}), _pad_pow2(vis.astype(jnp.int32), {1, 2})


def _tpu_ranges(vis):
  """(lo, hi, flags) flattened to 1-D for the scalar-prefetch operands (SMEM)."""
  lo, hi = _ranges(vis)
  return lo.reshape(-1), hi.reshape(-1), vis.astype(jnp.int32).reshape(-1)


def _clamp(j, lo, hi):
  """j clamped to [lo, hi]; block 0 when the range is empty (the step is skipped anyway)."""
  return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi, 0))


# ----------------------------------------------------------------------------- forward

def _forward(st: _Static, q, k, v, bias, side):
  b, n, tp, hp = q.shape
  sp = k.shape[2]
  nq, nk, g = tp // st.bq, sp // st.bk, st.groups
  vis = _visible(side, st.bq, st.bk, st)
  ints = _int_views(side)
  extra = [] if bias is None else [bias]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, n, tp, 1), _F32)]
  if st.schedule == 'gpu':
    lo, hi, flags = _gpu_ranges(vis)
    nqp, nkp = flags.shape[1:]
    qmap = lambda bi, ni, i: (bi, ni, i, 0)
    kmap = lambda bi, ni, i: (bi, ni // g, 0, 0)
    qcol = pl.BlockSpec((None, st.bq, 1), lambda bi, ni, i: (bi, i, 0))
    krow = pl.BlockSpec((None, 1, sp), lambda bi, ni, i: (bi, 0, 0))
    in_specs = [pl.BlockSpec((None, nqp), lambda bi, ni, i: (bi, 0)),
                pl.BlockSpec((None, nqp), lambda bi, ni, i: (bi, 0)),
                pl.BlockSpec((None, nqp, nkp), lambda bi, ni, i: (bi, 0, 0)),
                pl.BlockSpec((None, None, st.bq, hp), qmap),
                pl.BlockSpec((None, None, sp, hp), kmap), pl.BlockSpec((None, None, sp, hp), kmap),
                qcol, krow, qcol, krow]
    if bias is not None:
      in_specs.append(pl.BlockSpec((None, None, st.bq, sp),
                                   lambda bi, ni, i: st.bias_index(bi, ni) + (i, 0)))
    return _call(st, functools.partial(_fwd_kernel_gpu, st=st), grid=(b, n, nq), head_dim=hp,
                 in_specs=in_specs,
                 out_specs=[pl.BlockSpec((None, None, st.bq, hp), qmap),
                            pl.BlockSpec((None, None, st.bq, 1), qmap)],
                 out_shape=out_shape, name='flash_fwd')(lo, hi, flags, q, k, v, *ints, *extra)

  pltpu = compat.tpu()
  kblock = lambda bi, i, j, lo_, hi_: _clamp(j, lo_[bi * nq + i], hi_[bi * nq + i])
  qmap = lambda bi, ni, i, j, *_: (bi, ni, i, 0)
  kmap = lambda bi, ni, i, j, lo_, hi_, _: (bi, ni // g, kblock(bi, i, j, lo_, hi_), 0)
  qcol = pl.BlockSpec((None, st.bq, 1), lambda bi, ni, i, j, *_: (bi, i, 0))
  krow = pl.BlockSpec((None, 1, st.bk),
                      lambda bi, ni, i, j, lo_, hi_, _: (bi, 0, kblock(bi, i, j, lo_, hi_)))
  in_specs = [pl.BlockSpec((None, None, st.bq, hp), qmap),
              pl.BlockSpec((None, None, st.bk, hp), kmap),
              pl.BlockSpec((None, None, st.bk, hp), kmap), qcol, krow, qcol, krow]
  if bias is not None:
    in_specs.append(pl.BlockSpec(
        (None, None, st.bq, st.bk),
        lambda bi, ni, i, j, lo_, hi_, _: st.bias_index(bi, ni) + (i, kblock(bi, i, j, lo_, hi_))))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, n, nq, nk), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, st.bq, hp), qmap),
                 pl.BlockSpec((None, None, st.bq, 1), qmap)],
      scratch_shapes=[pltpu.VMEM((st.bq, 1), _F32), pltpu.VMEM((st.bq, 1), _F32),
                      pltpu.VMEM((st.bq, hp), _F32)])
  return _call(st, functools.partial(_fwd_kernel_tpu, st=st, nq=nq, nk=nk),
               grid_spec=grid_spec, out_shape=out_shape, name='flash_fwd')(
      *_tpu_ranges(vis), q, k, v, *ints, *extra)


def _fwd_kernel_gpu(*refs, st: _Static):
  refs = list(refs)
  bias_ref = refs.pop(10) if st.has_bias else None
  lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref = refs[:10]
  o_ref, lse_ref = refs[10:]
  i = pl.program_id(2)
  q, qseg, qpos = q_ref[...], qseg_ref[...], qpos_ref[...]

  def body(j, carry):
    def step(carry):
      sl = pl.ds(pl.multiple_of(j * st.bk, st.bk), st.bk)
      allowed = _allowed(qseg, qpos, kseg_ref[:, sl], kpos_ref[:, sl], st)
      bias = None if bias_ref is None else bias_ref[:, sl]
      return _fwd_step(q, k_ref[sl, :], v_ref[sl, :], bias, allowed, carry, st)
    return lax.cond(vis_ref[i, j] != 0, step, lambda c: c, carry)

  m, l, acc = lax.fori_loop(lo_ref[i], hi_ref[i] + 1, body, _init(st.bq, q.shape[-1]))
  o_ref[...], lse_ref[...] = _finish(m, l, acc, o_ref.dtype)


def _fwd_kernel_tpu(*refs, st: _Static, nq, nk):
  refs = list(refs)
  bias_ref = refs.pop(10) if st.has_bias else None
  (lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref, o_ref,
   lse_ref, m_scr, l_scr, acc_scr) = refs
  bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scr[...], l_scr[...], acc_scr[...] = _init(*acc_scr.shape)

  @pl.when(vis_ref[(bi * nq + i) * nk + j] != 0)
  def _():
    allowed = _allowed(qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...], st)
    bias = None if bias_ref is None else bias_ref[...]
    m_scr[...], l_scr[...], acc_scr[...] = _fwd_step(
        q_ref[...], k_ref[...], v_ref[...], bias, allowed,
        (m_scr[...], l_scr[...], acc_scr[...]), st)

  @pl.when(j == nk - 1)
  def _():
    o_ref[...], lse_ref[...] = _finish(m_scr[...], l_scr[...], acc_scr[...], o_ref.dtype)


# ----------------------------------------------------------------------------- backward: dQ

def _backward_dq(st: _Static, q, k, v, bias, side, vis, do, lse, delta):
  """dQ [B, N, T, H] and, with a bias, dZ [B, N, T, S] (fp32; zero where nothing is visible)."""
  b, n, tp, hp = q.shape
  sp = k.shape[2]
  nq, nk, g = tp // st.bqb, sp // st.bkb, st.groups
  ints = _int_views(side)
  extra = [] if bias is None else [bias]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if bias is not None:
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), _F32))
  if st.schedule == 'gpu':
    lo, hi, flags = _gpu_ranges(vis)
    nqp, nkp = flags.shape[1:]
    qmap = lambda bi, ni, i: (bi, ni, i, 0)
    kmap = lambda bi, ni, i: (bi, ni // g, 0, 0)
    qblock = pl.BlockSpec((None, None, st.bqb, hp), qmap)
    rowvec = pl.BlockSpec((None, None, st.bqb, 1), qmap)
    qcol = pl.BlockSpec((None, st.bqb, 1), lambda bi, ni, i: (bi, i, 0))
    krow = pl.BlockSpec((None, 1, sp), lambda bi, ni, i: (bi, 0, 0))
    in_specs = [pl.BlockSpec((None, nqp), lambda bi, ni, i: (bi, 0)),
                pl.BlockSpec((None, nqp), lambda bi, ni, i: (bi, 0)),
                pl.BlockSpec((None, nqp, nkp), lambda bi, ni, i: (bi, 0, 0)),
                qblock, pl.BlockSpec((None, None, sp, hp), kmap),
                pl.BlockSpec((None, None, sp, hp), kmap), qblock, rowvec, rowvec,
                qcol, krow, qcol, krow]
    out_specs = [qblock]
    if bias is not None:
      in_specs.append(pl.BlockSpec((None, None, st.bqb, sp),
                                   lambda bi, ni, i: st.bias_index(bi, ni) + (i, 0)))
      out_specs.append(pl.BlockSpec((None, None, st.bqb, sp), qmap))
    outs = _call(st, functools.partial(_dq_kernel_gpu, st=st), grid=(b, n, nq), head_dim=hp,
                 in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                 name='flash_bwd_dq')(lo, hi, flags, q, k, v, do, lse, delta, *ints, *extra)
    return outs[0], (outs[1] if bias is not None else None)

  pltpu = compat.tpu()
  kblock = lambda bi, i, j, lo_, hi_: _clamp(j, lo_[bi * nq + i], hi_[bi * nq + i])
  qmap = lambda bi, ni, i, j, *_: (bi, ni, i, 0)
  kmap = lambda bi, ni, i, j, lo_, hi_, _: (bi, ni // g, kblock(bi, i, j, lo_, hi_), 0)
  qblock = pl.BlockSpec((None, None, st.bqb, hp), qmap)
  rowvec = pl.BlockSpec((None, None, st.bqb, 1), qmap)
  qcol = pl.BlockSpec((None, st.bqb, 1), lambda bi, ni, i, j, *_: (bi, i, 0))
  krow = pl.BlockSpec((None, 1, st.bkb),
                      lambda bi, ni, i, j, lo_, hi_, _: (bi, 0, kblock(bi, i, j, lo_, hi_)))
  in_specs = [qblock, pl.BlockSpec((None, None, st.bkb, hp), kmap),
              pl.BlockSpec((None, None, st.bkb, hp), kmap), qblock, rowvec, rowvec,
              qcol, krow, qcol, krow]
  out_specs = [qblock]
  if bias is not None:
    in_specs.append(pl.BlockSpec(
        (None, None, st.bqb, st.bkb),
        lambda bi, ni, i, j, lo_, hi_, _: st.bias_index(bi, ni) + (i, kblock(bi, i, j, lo_, hi_))))
    # Every block of d bias is written (zeros where skipped), so its index map is not clamped.
    out_specs.append(pl.BlockSpec((None, None, st.bqb, st.bkb), lambda bi, ni, i, j, *_:
                                  (bi, ni, i, j)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, n, nq, nk), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((st.bqb, hp), _F32)])
  outs = _call(st, functools.partial(_dq_kernel_tpu, st=st, nq=nq, nk=nk),
               grid_spec=grid_spec, out_shape=out_shape, name='flash_bwd_dq')(
      *_tpu_ranges(vis), q, k, v, do, lse, delta, *ints, *extra)
  return outs[0], (outs[1] if bias is not None else None)


def _dq_kernel_gpu(*refs, st: _Static):
  refs = list(refs)
  bias_ref = refs.pop(13) if st.has_bias else None
  dbias_ref = refs.pop(14) if st.has_bias else None
  (lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
   qpos_ref, kpos_ref, dq_ref) = refs
  i = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qseg, qpos = qseg_ref[...], qpos_ref[...]
  if dbias_ref is not None:
    # Zero d bias tile by tile (Triton wants power-of-two shapes; the row of S is not one);
    # the visible tiles are overwritten below.
    def zero(j, carry):
      dbias_ref[:, pl.ds(pl.multiple_of(j * st.bkb, st.bkb), st.bkb)] = jnp.zeros(
          (dbias_ref.shape[0], st.bkb), dbias_ref.dtype)
      return carry
    lax.fori_loop(0, dbias_ref.shape[1] // st.bkb, zero, 0)

  def body(j, dq):
    def step(dq):
      sl = pl.ds(pl.multiple_of(j * st.bkb, st.bkb), st.bkb)
      k = k_ref[sl, :]
      allowed = _allowed(qseg, qpos, kseg_ref[:, sl], kpos_ref[:, sl], st)
      bias = None if bias_ref is None else bias_ref[:, sl]
      dz, _ = _grad_logits(q, k, v_ref[sl, :], bias, do, lse, delta, allowed, st)
      if dbias_ref is not None:
        dbias_ref[:, sl] = dz
      return dq + _dot(dz.astype(k.dtype), k)
    return lax.cond(vis_ref[i, j] != 0, step, lambda d: d, dq)

  dq = lax.fori_loop(lo_ref[i], hi_ref[i] + 1, body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dq_kernel_tpu(*refs, st: _Static, nq, nk):
  refs = list(refs)
  bias_ref = refs.pop(13) if st.has_bias else None
  dbias_ref = refs.pop(14) if st.has_bias else None
  (lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
   qpos_ref, kpos_ref, dq_ref, dq_scr) = refs
  bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  visible = vis_ref[(bi * nq + i) * nk + j] != 0

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

  @pl.when(visible)
  def _():
    k = k_ref[...]
    allowed = _allowed(qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...], st)
    bias = None if bias_ref is None else bias_ref[...]
    dz, _ = _grad_logits(q_ref[...], k, v_ref[...], bias, do_ref[...], lse_ref[...],
                         delta_ref[...], allowed, st)
    if dbias_ref is not None:
      dbias_ref[...] = dz
    dq_scr[...] += _dot(dz.astype(k.dtype), k)

  if dbias_ref is not None:
    @pl.when(jnp.logical_not(visible))
    def _():
      dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

  @pl.when(j == nk - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- backward: dK, dV

def _backward_dkv(st: _Static, q, k, v, bias, side, vis, do, lse, delta):
  """A key block of kv head h accumulates over the query blocks of heads h*G ... h*G + G-1,
  read from q viewed as [B, K, G*T, H] (row c*T + t is query t of head h*G + c)."""
  b, n, tp, hp = q.shape
  kh, sp = k.shape[1], k.shape[2]
  nq, nk, g = tp // st.bqb, sp // st.bkb, st.groups
  vis = jnp.swapaxes(vis, 1, 2)  # [B, nk, nq]: the query-block range of each key block
  ints = _int_views(side)
  grouped = lambda x: x.reshape(x.shape[0], x.shape[1] // g, g * tp, x.shape[-1])
  q, do, lse, delta = grouped(q), grouped(do), grouped(lse), grouped(delta)
  bias_rows = g * tp if st.bias_heads else tp
  extra = []
  if bias is not None:
    extra = [grouped(bias) if st.bias_heads else bias]
  bias_head = lambda bi, hk: (bi if st.bias_batch else 0, hk if st.bias_heads else 0)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if st.schedule == 'gpu':
    lo, hi, flags = _gpu_ranges(vis)
    nkp, nqp = flags.shape[1:]
    kblock = pl.BlockSpec((None, None, st.bkb, hp), lambda bi, hk, j: (bi, hk, j, 0))
    qall = lambda width: pl.BlockSpec((None, None, g * tp, width), lambda bi, hk, j: (bi, hk, 0, 0))
    qcol = pl.BlockSpec((None, tp, 1), lambda bi, hk, j: (bi, 0, 0))
    krow = pl.BlockSpec((None, 1, st.bkb), lambda bi, hk, j: (bi, 0, j))
    in_specs = [pl.BlockSpec((None, nkp), lambda bi, hk, j: (bi, 0)),
                pl.BlockSpec((None, nkp), lambda bi, hk, j: (bi, 0)),
                pl.BlockSpec((None, nkp, nqp), lambda bi, hk, j: (bi, 0, 0)),
                qall(hp), kblock, kblock, qall(hp), qall(1), qall(1), qcol, krow, qcol, krow]
    if bias is not None:
      in_specs.append(pl.BlockSpec((None, None, bias_rows, st.bkb),
                                   lambda bi, hk, j: bias_head(bi, hk) + (0, j)))
    return _call(st, functools.partial(_dkv_kernel_gpu, st=st, nq=nq), grid=(b, kh, nk),
                 head_dim=hp, in_specs=in_specs, out_specs=[kblock, kblock], out_shape=out_shape,
                 name='flash_bwd_dkv')(lo, hi, flags, q, k, v, do, lse, delta, *ints, *extra)

  pltpu = compat.tpu()
  # Grid axis 3 runs over c = group * nq + query block, the block clamped into the visible range.
  qblk = lambda bi, j, c, lo_, hi_: _clamp(c % nq, lo_[bi * nk + j], hi_[bi * nk + j])
  qmap = lambda bi, hk, j, c, lo_, hi_, _: (bi, hk, (c // nq) * nq + qblk(bi, j, c, lo_, hi_), 0)
  kblock = pl.BlockSpec((None, None, st.bkb, hp), lambda bi, hk, j, c, *_: (bi, hk, j, 0))
  rowvec = pl.BlockSpec((None, None, st.bqb, 1), qmap)
  qcol = pl.BlockSpec((None, st.bqb, 1),
                      lambda bi, hk, j, c, lo_, hi_, _: (bi, qblk(bi, j, c, lo_, hi_), 0))
  krow = pl.BlockSpec((None, 1, st.bkb), lambda bi, hk, j, c, *_: (bi, 0, j))
  in_specs = [pl.BlockSpec((None, None, st.bqb, hp), qmap), kblock, kblock,
              pl.BlockSpec((None, None, st.bqb, hp), qmap), rowvec, rowvec,
              qcol, krow, qcol, krow]
  if bias is not None:
    brow = lambda bi, j, c, lo_, hi_: ((c // nq) * nq if st.bias_heads else 0) + qblk(
        bi, j, c, lo_, hi_)
    in_specs.append(pl.BlockSpec(
        (None, None, st.bqb, st.bkb),
        lambda bi, hk, j, c, lo_, hi_, _: bias_head(bi, hk) + (brow(bi, j, c, lo_, hi_), j)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, kh, nk, g * nq), in_specs=in_specs,
      out_specs=[kblock, kblock],
      scratch_shapes=[pltpu.VMEM((st.bkb, hp), _F32), pltpu.VMEM((st.bkb, hp), _F32)])
  return _call(st, functools.partial(_dkv_kernel_tpu, st=st, nq=nq, nk=nk, g=g),
               grid_spec=grid_spec, out_shape=out_shape, name='flash_bwd_dkv')(
      *_tpu_ranges(vis), q, k, v, do, lse, delta, *ints, *extra)


def _dkv_step(q, k, v, bias, do, lse, delta, allowed, carry, st: _Static):
  dk, dv = carry
  dz, p = _grad_logits(q, k, v, bias, do, lse, delta, allowed, st)
  return dk + _dot(dz.astype(q.dtype).T, q), dv + _dot(p.astype(do.dtype).T, do)


def _dkv_kernel_gpu(*refs, st: _Static, nq):
  refs = list(refs)
  bias_ref = refs.pop(13) if st.has_bias else None
  (lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
   qpos_ref, kpos_ref, dk_ref, dv_ref) = refs
  j = pl.program_id(2)
  k, v, kseg, kpos = k_ref[...], v_ref[...], kseg_ref[...], kpos_ref[...]
  lo, hi = lo_ref[j], hi_ref[j]
  count = jnp.maximum(hi - lo + 1, 0)

  def body(c, carry):
    i = lo + c % count
    def step(carry):
      rows = pl.ds(pl.multiple_of(((c // count) * nq + i) * st.bqb, st.bqb), st.bqb)
      cols = pl.ds(pl.multiple_of(i * st.bqb, st.bqb), st.bqb)
      allowed = _allowed(qseg_ref[cols, :], qpos_ref[cols, :], kseg, kpos, st)
      bias = None if bias_ref is None else bias_ref[rows if st.bias_heads else cols, :]
      return _dkv_step(q_ref[rows, :], k, v, bias, do_ref[rows, :], lse_ref[rows, :],
                       delta_ref[rows, :], allowed, carry, st)
    return lax.cond(vis_ref[j, i] != 0, step, lambda cr: cr, carry)

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = lax.fori_loop(0, count * st.groups, body, (zeros, zeros))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_kernel_tpu(*refs, st: _Static, nq, nk, g):
  refs = list(refs)
  bias_ref = refs.pop(13) if st.has_bias else None
  (lo_ref, hi_ref, vis_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
   qpos_ref, kpos_ref, dk_ref, dv_ref, dk_scr, dv_scr) = refs
  bi, j, c = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(c == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

  @pl.when(vis_ref[(bi * nk + j) * nq + c % nq] != 0)
  def _():
    allowed = _allowed(qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...], st)
    bias = None if bias_ref is None else bias_ref[...]
    dk_scr[...], dv_scr[...] = _dkv_step(
        q_ref[...], k_ref[...], v_ref[...], bias, do_ref[...], lse_ref[...], delta_ref[...],
        allowed, (dk_scr[...], dv_scr[...]), st)

  @pl.when(c == g * nq - 1)
  def _():
    dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def reference_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                        kv_positions=None, causal=False, window=None, scale=None,
                        logit_softcap=None, bias=None) -> jax.Array:
  """The dense computation the kernels must equal (`dot_product_attention` with the same mask)."""
  b, t = q.shape[:2]
  s = k.shape[1]
  ones = lambda length: jnp.ones((b, length), jnp.int32)
  mask = AttentionMask(
      q_segment_ids=ones(t) if q_segment_ids is None else q_segment_ids,
      kv_segment_ids=ones(s) if kv_segment_ids is None else kv_segment_ids,
      q_positions=q_positions, kv_positions=kv_positions, causal=causal, window=window)
  return dot_product_attention(q, k, v, mask, bias=bias, scale=scale, logit_softcap=logit_softcap)
