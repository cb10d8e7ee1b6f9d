"""Nystromformer (Xiong et al. 2021, eq. 14): softmax attention through m landmarks.

    F = softmax(s Q K~^T)  [T, m],   A = softmax(s Q~ K~^T)  [m, m],   B = softmax(s Q~ K^T)  [m, S]
    head = F A^+ (B V)  (+ depthwise conv of V over the sequence when conv_kernel > 0)

Shapes: B batch, T = S sequence length (self-attention), N query heads, K kv heads, G = N / K,
H head dim, M and J landmark indices, m = min(num_landmarks, T). The landmarks Q~, K~ are the
means of m contiguous segments of the queries and keys (segment j holds the positions t with
floor(t m / T) = j, so T need not be a multiple of m: sizes differ by at most one). Nothing of
size T x S exists: memory is O(n m).

A^+ is the iterative Moore-Penrose pseudo-inverse of the paper (eq. 13, after Razavi et al.
2014): Z_0 = A^T / (||A||_1 ||A||_inf), Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))
/ 4, `pinv_iterations` times. It converges to A^+ (slowly for ill-conditioned A), so the kind is
an approximation even with m = T, where F = A = B = softmax(s Q K^T) and F A^+ B = A exactly in
the limit. Everything is computed in float32.

Padding: keys (queries) with segment id 0 are left out of the landmark means; padded keys are
masked out of B's softmax; a landmark segment with no valid key (query) is dropped, i.e. its
column of F and A (its row of A and B) is zero, which the pseudo-inverse iteration preserves;
padded queries return 0 and padded values are zeroed before the conv. Packed sequences (several
non-zero segment ids in one row) are not isolated: landmarks average over the whole row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import MASKED_LOGIT, query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError
from jaxformer.layers import base

_LANDMARKS = 'landmarks are means over the whole sequence, so '


def iterative_pinv(a: jax.Array, iterations: int) -> jax.Array:
  """Approximate Moore-Penrose pseudo-inverse of a [..., M, J] -> [..., J, M] (paper eq. 13)."""
  norm_1 = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
  norm_inf = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)
  denom = norm_1 * norm_inf
  z = jnp.swapaxes(a, -1, -2) / jnp.where(denom > 0, denom, 1.0)[..., None, None]
  eye = jnp.eye(a.shape[-2], dtype=a.dtype)
  for _ in range(iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def _segments(valid: jax.Array, m: int) -> jax.Array:
  """valid [B, n] bool -> P [B, n, m] float32, P[b, t, j] = 1 if token t is valid, in segment j."""
  n = valid.shape[1]
  seg = (jnp.arange(n) * m) // n
  return jax.nn.one_hot(seg, m, dtype=jnp.float32)[None] * valid[:, :, None]


def _masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """softmax over the last axis where `allowed`; rows with nothing allowed are 0."""
  probs = jax.nn.softmax(jnp.where(allowed, logits, MASKED_LOGIT), axis=-1)
  return jnp.where(allowed, probs, 0.0)


@registry.register('nystrom', 'xla', unsupported={
    'segments': 'segment-mean landmarks mix every token of a row, so packed examples would '
                'see each other',
    'causal': _LANDMARKS + 'every output would see future tokens through them',
    'decode': _LANDMARKS + 'they change with every new token and there is no incremental cache; '
              'Nystromformer is a bidirectional (encoder) kind',
    'cross': 'query landmarks average over all queries, so in a decoder\'s cross-attention '
             'position t would see later decoder tokens',
    'window': _LANDMARKS + 'a band of key positions cannot be imposed on them',
    'bias': 'the logits are between tokens and landmarks: there is no [T, S] logit for an '
            'additive bias (ALiBi, T5) to add to',
    'shaw': 'the logits are between tokens and landmarks: relative key/value terms have no '
            '[T, S] pair to index',
    'weights': 'the attention map is only implied as F A^+ B; no [T, S] probabilities exist to sow',
    'dropout': 'the attention map is only implied as F A^+ B; no [T, S] probabilities exist to '
               'drop',
    'softcap': 'soft-capping bounds [T, S] logits, which Nystromformer never forms',
})
class NystromAttention(nnx.Module):
  """Nystromformer core; options `num_landmarks` (64), `pinv_iterations` (6), `conv_kernel` (0).

  With conv_kernel > 0 (odd) the parameter `conv` [conv_kernel, N] is a depthwise convolution of
  the values over the sequence, one kernel per query head, added to the output (the paper's skip).
  """

  features = frozenset({'padding'})
  example_options = {'num_landmarks': 4}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'num_landmarks': 64, 'pinv_iterations': 6, 'conv_kernel': 0})
    del dtype, unused
    for key, low in (('num_landmarks', 1), ('pinv_iterations', 0), ('conv_kernel', 0)):
      if not isinstance(opts[key], int) or opts[key] < low:
        raise ConfigError(f'model.attention.options.{key}={opts[key]!r} is invalid: an integer '
                          f'>= {low}')
    if opts['conv_kernel'] and opts['conv_kernel'] % 2 == 0:
      raise ConfigError(f'model.attention.options.conv_kernel={opts["conv_kernel"]} is invalid: '
                        '0 (no conv skip) or odd, so the convolution is centred')
    self.num_landmarks = opts['num_landmarks']
    self.pinv_iterations = opts['pinv_iterations']
    self.conv_kernel = opts['conv_kernel']
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    if self.conv_kernel:
      if rngs is None:
        raise ValueError('NystromAttention with conv_kernel > 0 has parameters and needs rngs')
      init = nnx.initializers.lecun_normal(in_axis=0, out_axis=1)
      self.conv = base.param(rngs, init, (self.conv_kernel, num_heads), (None, 'heads'),
                             param_dtype or jnp.float32)
    else:
      self.conv = None

  def _conv_skip(self, v: jax.Array) -> jax.Array:
    """Depthwise 'same' convolution over S of v [B, S, K, H] per query head -> [B, S, K, G, H]."""
    b, s, kh, h = v.shape
    c = self.conv_kernel
    w = self.conv[...].astype(jnp.float32).reshape(c, kh, self.num_heads // kh)
    padded = jnp.pad(v, ((0, 0), (c // 2, c // 2), (0, 0), (0, 0)))
    return sum(jnp.einsum('BSKH,KG->BSKGH', padded[:, i:i + s], w[i]) for i in range(c))

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
               bias=None, **unused) -> jax.Array:
    mask = AttentionMask() if mask is None else mask
    if mask.causal or mask.window is not None or mask.extra is not None or bias is not None:
      raise ValueError('nystrom attention takes only segment ids: a causal, windowed, extra or '
                       'bias mask needs [T, S] logits, which landmarks replace')
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if t != s:
      raise ValueError(f'nystrom attention is self-attention: {t} queries but {s} keys')
    g, m = query_groups(n, kh), min(self.num_landmarks, t)
    q_valid = (mask.q_segment_ids != 0 if mask.q_segment_ids is not None
               else jnp.ones((b, t), bool))
    k_valid = (mask.kv_segment_ids != 0 if mask.kv_segment_ids is not None
               else jnp.ones((b, s), bool))
    qg = q.astype(jnp.float32).reshape(b, t, kh, g, h) * self.scale
    k32 = k.astype(jnp.float32)
    v32 = jnp.where(k_valid[:, :, None, None], v.astype(jnp.float32), 0.0)

    pq, pk = _segments(q_valid, m), _segments(k_valid, m)
    q_count, k_count = pq.sum(1), pk.sum(1)  # [B, m]
    q_land = (jnp.einsum('BTKGH,BTM->BMKGH', qg, pq)
              / jnp.maximum(q_count, 1.0)[:, :, None, None, None])
    k_land = jnp.einsum('BSKH,BSJ->BJKH', k32, pk) / jnp.maximum(k_count, 1.0)[:, :, None, None]
    k_land_ok = (k_count > 0)[:, None, None, None, :]   # a key landmark column exists
    q_land_ok = (q_count > 0)[:, None, None, :, None]   # a query landmark row exists

    f = _masked_softmax(jnp.einsum('BTKGH,BJKH->BKGTJ', qg, k_land), k_land_ok)
    a = _masked_softmax(jnp.einsum('BMKGH,BJKH->BKGMJ', q_land, k_land), k_land_ok & q_land_ok)
    b_kernel = _masked_softmax(jnp.einsum('BMKGH,BSKH->BKGMS', q_land, k32),
                               k_valid[:, None, None, None, :] & q_land_ok)
    bv = jnp.einsum('BKGMS,BSKH->BKGMH', b_kernel, v32)
    zbv = jnp.einsum('BKGJM,BKGMH->BKGJH', iterative_pinv(a, self.pinv_iterations), bv)
    out = jnp.einsum('BKGTJ,BKGJH->BTKGH', f, zbv)
    if self.conv is not None:
      out = out + self._conv_skip(v32)
    out = jnp.where(q_valid[:, :, None, None, None], out, 0.0)
    return out.reshape(b, t, n, h).astype(q.dtype)
