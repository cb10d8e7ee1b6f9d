"""Linear attention (Katharopoulos et al. 2020), kind 'linear', and its shared kernel engine.

With a positive feature map phi, softmax(q k^T) is replaced by phi(q) phi(k)^T (eq. 4-5):

    bidirectional  out_t = phi(q_t)^T sum_s phi(k_s) v_s^T / phi(q_t)^T sum_s phi(k_s)
    causal         S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t),
                   out_t = phi(q_t)^T S_t / phi(q_t)^T z_t                          (eq. 16-20)

with phi(x) = elu(x) + 1 (eq. 7); no 1/sqrt(H) scale (the paper applies phi to q and k as they
are). Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head
dim, F feature dim (F = H here), C chunk. States: S [B, K, F, H], z [B, K, F], float32.

The causal form is computed in chunks of C tokens (`chunk_size`): inside a chunk a masked
C x C product phi(Q) phi(K)^T, across chunks the running state (S, z) carried by `lax.scan`, so
memory is O(T C + T F H / C). Decoding continues the same recurrence from a state (the registry's
stateful protocol).

Segments: keys with segment id 0 (padding) contribute nothing and queries with id 0 return 0.
Packed rows (ids 1, 2, ...) are exact when each segment occupies one contiguous run of tokens, as
packing produces: the carried state belongs to the last segment seen and is reset when a new one
begins. The bidirectional form with segment ids runs that engine twice, forwards (s <= t) and
backwards (s > t), and adds the sums. Without segment ids, and in cross-attention, it uses the
global sums (cross-attention compares segment ids only with 0: keys of every nonzero id are seen).

`kernel_attention` is shared with the Performer (performer.py): it takes query features and a
key-feature function that may return a per-chunk log-scale, so features of the form exp(.) are
stabilised with a running maximum exactly like an online softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig

NEG = -1e30  # log-scale of "no keys yet"; finite so that NEG - NEG = 0

# (k [B, C, K, H], valid [B, C] bool) -> (features [B, C, K, F] zero where invalid,
# log-scale [B, K]): the true features are features * exp(log-scale).
KeyFeatures = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _prefix(fq: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array, kseg: jax.Array,
            key_features: KeyFeatures, carry, *, chunk: int, inclusive: bool):
  """Chunked causal sums over aligned rows (T = S).

  Args:
    fq: query features [B, T, K, G, F]; k, v: [B, T, K, H]; qseg, kseg: [B, T] int.
    carry: (S [B, K, F, H], z [B, K, F], log-scale [B, K], running segment id [B]).
    inclusive: s <= t (True) or s < t (False).
  Returns:
    (numerator [B, T, K, G, H], denominator [B, T, K, G], log-scale [B, T, K], final carry).
  """
  b, t = qseg.shape
  c = min(chunk, t)
  tp = -(-t // c) * c

  def split(x):  # [B, T, ...] -> [T / C, B, C, ...]
    x = _pad_to(x, 1, tp)
    return jnp.moveaxis(x.reshape((b, tp // c, c) + x.shape[2:]), 1, 0)

  idx = jnp.arange(c)
  tri = idx[:, None] >= idx[None, :] if inclusive else idx[:, None] > idx[None, :]

  def step(carry, xs):
    s, z, r, seg = carry
    fq_c, k_c, v_c, qs, ks = xs
    valid = ks != 0
    fk, ls = key_features(k_c, valid)
    m = jnp.maximum(r, ls)
    fk = fk * jnp.exp(ls - m)[:, None, :, None]
    decay = jnp.exp(r - m)
    s, z = s * decay[..., None, None], z * decay[..., None]
    same = (qs[:, :, None] == ks[:, None, :]) & valid[:, None, :] & (qs != 0)[:, :, None]
    a = jnp.einsum('BTKGF,BSKF->BKGTS', fq_c, fk)
    a = jnp.where((same & tri)[:, None, None], a, 0.0)
    num = jnp.einsum('BKGTS,BSKH->BTKGH', a, v_c)
    den = jnp.einsum('BKGTS->BTKG', a)
    see = ((qs == seg[:, None]) & (qs != 0))[:, :, None, None]
    num = num + jnp.where(see[..., None], jnp.einsum('BTKGF,BKFH->BTKGH', fq_c, s), 0.0)
    den = den + jnp.where(see, jnp.einsum('BTKGF,BKF->BTKG', fq_c, z), 0.0)
    # The state now follows the segment of the chunk's last real token.
    last = jnp.max(jnp.where(valid, idx, -1), axis=1)
    new_seg = jnp.where(last >= 0, jnp.take_along_axis(ks, jnp.maximum(last, 0)[:, None], 1)[:, 0],
                        seg)
    keep = (new_seg == seg)[:, None, None]
    w = ((ks == new_seg[:, None]) & valid)[:, :, None, None].astype(fk.dtype)
    s = jnp.where(keep[..., None], s, 0.0) + jnp.einsum('BSKF,BSKH->BKFH', fk * w, v_c)
    z = jnp.where(keep, z, 0.0) + jnp.einsum('BSKF->BKF', fk * w)
    lscale = jnp.broadcast_to(m[:, None], (b, c) + m.shape[1:])
    return (s, z, m, new_seg), (num, den, lscale)

  xs = tuple(split(x) for x in (fq, k.astype(jnp.float32), v.astype(jnp.float32), qseg, kseg))
  carry, (num, den, lscale) = jax.lax.scan(step, carry, xs)
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, tp) + x.shape[3:])[:, :t]
  return merge(num), merge(den), merge(lscale), carry


def kernel_attention(fq: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                     key_features: KeyFeatures, *, feature_dim: int, chunk_size: int,
                     state: dict | None = None):
  """Linearised attention out = phi(q) . sums / phi(q) . normaliser.

  Args:
    fq: query features [B, T, K, G, F] (float32).
    k, v: [B, S, K, H].
    mask: segment ids (0 = padding) and `causal`; windows and extra masks are not supported.
    key_features: maps a block of keys to (features, log-scale), see KeyFeatures.
    state: decoding state {'s', 'z', optional 'shift'}; the call then continues the causal
      recurrence over the T = S new tokens (nonzero segment ids all count as the one sequence).
  Returns:
    out [B, T, K, G, H] float32, and the new state when `state` was given.
  """
  if mask.window is not None or mask.extra is not None:
    raise ValueError('linearised attention keeps sums over all visible keys; it cannot apply a '
                     'sliding window or an extra boolean mask')
  b, t, kh = fq.shape[0], fq.shape[1], fq.shape[2]
  s_len, h = k.shape[1], v.shape[-1]
  qseg, kseg = mask.q_segment_ids, mask.kv_segment_ids

  def start():
    return (jnp.zeros((b, kh, feature_dim, h), jnp.float32),
            jnp.zeros((b, kh, feature_dim), jnp.float32), jnp.full((b, kh), NEG, jnp.float32),
            jnp.zeros((b,), jnp.int32))

  new_state = None
  if state is not None or mask.causal:
    if t != s_len:
      raise ValueError(f'causal linearised attention needs as many keys as queries, got T={t} '
                       f'and S={s_len}; decoding passes state= instead of a KV cache')
    qseg = jnp.ones((b, t), jnp.int32) if qseg is None else qseg
    kseg = qseg if kseg is None else kseg
    if state is None:
      carry = start()
    else:  # one sequence per row: every nonzero id continues it
      qseg, kseg = (qseg != 0).astype(jnp.int32), (kseg != 0).astype(jnp.int32)
      carry = (state['s'], state['z'], state.get('shift', jnp.zeros((b, kh), jnp.float32)),
               jnp.ones((b,), jnp.int32))
    num, den, _, carry = _prefix(fq, k, v, qseg, kseg, key_features, carry, chunk=chunk_size,
                                 inclusive=True)
    if state is not None:
      new_state = {'s': carry[0], 'z': carry[1]}
      if 'shift' in state:
        new_state['shift'] = carry[2]
  elif qseg is not None and kseg is not None and t == s_len:
    fwd = _prefix(fq, k, v, qseg, kseg, key_features, start(), chunk=chunk_size, inclusive=True)
    flip = lambda x: jnp.flip(x, 1)
    bwd = _prefix(flip(fq), flip(k), flip(v), flip(qseg), flip(kseg), key_features, start(),
                  chunk=chunk_size, inclusive=False)
    lf, lb = fwd[2], flip(bwd[2])
    top = jnp.maximum(lf, lb)
    wf, wb = jnp.exp(lf - top)[..., None], jnp.exp(lb - top)[..., None]
    num = fwd[0] * wf[..., None] + flip(bwd[0]) * wb[..., None]
    den = fwd[1] * wf + flip(bwd[1]) * wb
  else:
    valid = jnp.ones((b, s_len), bool) if kseg is None else kseg != 0
    fk, _ = key_features(k, valid)
    sums = jnp.einsum('BSKF,BSKH->BKFH', fk, v.astype(jnp.float32))
    num = jnp.einsum('BTKGF,BKFH->BTKGH', fq, sums)
    den = jnp.einsum('BTKGF,BSKF->BTKG', fq, fk)
    if qseg is not None:
      live = (qseg != 0)[:, :, None, None]
      num, den = jnp.where(live[..., None], num, 0.0), jnp.where(live, den, 0.0)
  out = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  return out if state is None else (out, new_state)


def elu_features(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1 in float32 (eq. 7)."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


UNSUPPORTED = {
    'bias': 'there are no logits to add a bias to: phi(q) . phi(k) is never formed per pair',
    'window': 'the running sums cover the whole prefix; a window would need per-offset states',
    'dropout': 'there is no probability matrix to drop entries from',
    'weights': 'the n x n attention weights are never formed',
    'softcap': 'there are no logits to soft-cap',
    'shaw': "Shaw's value term needs the full probability matrix",
}


@registry.register('linear', unsupported=UNSUPPORTED)
class LinearAttention(nnx.Module):
  """Katharopoulos et al. linear attention (see module docstring).

  Options (`model.attention.options`): `chunk_size` (default 64), the block length of the causal
  and the segment-aware bidirectional forms.
  """

  features = frozenset({'causal', 'padding', 'segments', 'decode', 'cross'})
  example_options = {'chunk_size': 4}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'chunk_size': 64})
    del dtype, param_dtype, rngs, unused  # no parameters
    if int(opts['chunk_size']) < 1:
      raise ValueError(f'model.attention.options.chunk_size must be >= 1, got {opts["chunk_size"]}')
    query_groups(num_heads, num_kv_heads)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.chunk_size = int(opts['chunk_size'])

  def init_state(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """Empty running sums {'s': [B, K, H, H], 'z': [B, K, H]} (float32, any length)."""
    del max_len, dtype
    k, h = self.num_kv_heads, self.head_dim
    return {'s': jnp.zeros((batch, k, h, h), jnp.float32),
            'z': jnp.zeros((batch, k, h), jnp.float32)}

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, state: dict | None = None, **unused):
    del bias, deterministic, dropout_rng, unused  # refused features
    mask = AttentionMask() if mask is None else mask
    b, t, n, h = q.shape
    fq = elu_features(q).reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    key_features = lambda k, valid: (elu_features(k) * valid[:, :, None, None],
                                     jnp.zeros((k.shape[0], k.shape[2]), jnp.float32))
    res = kernel_attention(fq, k, v, mask, key_features, feature_dim=h,
                           chunk_size=self.chunk_size, state=state)
    out, new_state = res if state is not None else (res, None)
    out = out.reshape(b, t, n, h).astype(q.dtype)
    return out if state is None else (out, new_state)
