"""Routing attention (Roy et al. 2021, sec. 4): softmax attention inside online k-means clusters.

    q^_t = LN(q_t), k^_s = LN(k_s)              layer norm over H without scale or bias (sec. 4)
    Q_c = the w queries nearest to centroid mu_c, K_c = the w keys nearest to mu_c,  w = ceil(n / C)
    y_t = mean over {c : t in Q_c} of  sum_{s in K_c} softmax_s(s q_t . k_s, masked) v_s    

Shapes: B batch, T query length, S key length, N query heads, K kv heads, H head dim, C clusters
(`num_clusters`), W = ceil(T / C) queries and ceil(S / C) keys per cluster. Centroids are per
query head, mu [N, C, H]; the keys of a grouped-query kv head are routed with the centroids of
each query head that reads them.

Routing follows the paper's practical implementation: instead of letting clusters grow unevenly
(argmin assignment), each centroid takes the top-w queries and top-w keys by closeness
(-|x^ - mu_c|^2, i.e. x^ . mu_c - |mu_c|^2 / 2 since |x^|^2 is constant), so every cluster has the
same size and attention costs C w^2 ~ n^2 / C logits per head instead of n^2. A token can be
chosen by several centroids (its output is the mean over them) or by none (its output is 0).
Padding tokens (segment id 0) are ranked last, so they never displace a real token; causality
and packed segments are masked inside each cluster by the gathered positions and segment ids
with `core.dot_product_attention` (fully masked rows -> 0).

Causality caveat: the top-w selection ranks a token against the whole sequence, so with C >= 2
which cluster a query lands in (and which earlier keys share it) can change when later tokens
change. Within-cluster masking is exact, but strict causality (CATALOG generic property) holds
only for C = 1, where routing is full attention; a causal layer with num_clusters > 1 is
therefore refused at build time (encoders use any C). The memory is n^2 / C per head: with a fixed
`num_clusters` it is still quadratic in n (the paper takes C ~ sqrt(n)), so the kind does not
claim `subquadratic`.

Online k-means (sec. 4): with deterministic=False, each centroid moves toward the mean
m_c of the normalised queries and keys (real tokens, whole batch) whose nearest centroid it is,
    mu_c <- decay mu_c + (1 - decay) m_c      (clusters with no assigned vector keep mu_c),
after routing the current call. The centroids are a `Centroids` variable (not an nnx.Param, no
gradient); NNX carries the in-place update out of nnx.jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import dot_product_attention, query_groups
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError

_EPS = 1e-6
_NOT_IMPLEMENTED = 'not implemented for routing attention'


class Centroids(nnx.Variable):
  """k-means centroids [N, C, H] of routing attention, updated by EMA instead of gradients."""


def normalize(x: jax.Array) -> jax.Array:
  """Layer norm over the head dim without scale or bias, in float32 (|x^| = sqrt(H))."""
  x = x.astype(jnp.float32)
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + _EPS)


def closeness(x: jax.Array, mu: jax.Array, valid: jax.Array) -> jax.Array:
  """-|x^ - mu_c|^2 / 2 up to a constant, [B, N, C, L] for x^ [B, L, N, H], mu [N, C, H].

  Padding (valid [B, L] False) gets -inf, so it is ranked below every real token.
  """
  score = (jnp.einsum('BLNH,NCH->BNCL', x, mu)
           - 0.5 * jnp.sum(mu * mu, axis=-1)[None, :, :, None])
  return jnp.where(valid[:, None, None, :], score, -jnp.inf)


def route(score: jax.Array, num_clusters: int) -> jax.Array:
  """Indices [B, N, C, w] of the w = ceil(L / C) tokens nearest each centroid."""
  width = -(-score.shape[-1] // num_clusters)
  return jax.lax.top_k(score, width)[1]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, L, ...] at idx [B, N, C, w] -> [B, N, C, w, ...]."""
  return jax.vmap(jax.vmap(lambda a, i: a[i]))(x, idx)


def _scatter_mean(y: jax.Array, idx: jax.Array, length: int) -> jax.Array:
  """Mean over clusters of y [B, N, C, w, H] at positions idx [B, N, C, w] -> [B, N, L, H]."""

  def one(y, i):
    i = i.reshape(-1)
    total = jnp.zeros((length, y.shape[-1]), y.dtype).at[i].add(y.reshape(-1, y.shape[-1]))
    count = jnp.zeros((length,), y.dtype).at[i].add(1.0)
    return total / jnp.maximum(count, 1.0)[:, None]

  return jax.vmap(jax.vmap(one))(y, idx)


@registry.register('routing', 'xla', unsupported={
    'decode': 'the top-w routing ranks each token against the whole sequence, so a cached step '
              'cannot reproduce the clusters of the full forward pass',
    'cross': _NOT_IMPLEMENTED,
    'window': _NOT_IMPLEMENTED,
    'bias': 'an additive [T, S] bias would have to be gathered per cluster; ' + _NOT_IMPLEMENTED,
    'softcap': _NOT_IMPLEMENTED,
    'shaw': _NOT_IMPLEMENTED,
    'weights': 'the probabilities exist only per cluster [C, w, w]; there is no [T, S] map to sow',
})
class RoutingAttention(nnx.Module):
  """Routing Transformer core; options `num_clusters` (4), `decay` (0.999).

  `centroids` is a `Centroids` variable [N, C, H], initialised N(0, 1) (the scale of normalised
  vectors, |x^| = sqrt(H)) and updated by EMA on calls with deterministic=False.
  """

  features = frozenset({'causal', 'padding', 'segments', 'dropout'})
  # One cluster (full attention) for the generic tests: with C >= 2 a query sees only its
  # cluster, so d out_t / d x_s is 0 for some s <= t, and routing sees later tokens (see above).
  example_options = {'num_clusters': 1}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'num_clusters': 4, 'decay': 0.999})
    c, decay = opts['num_clusters'], opts['decay']
    if not isinstance(c, int) or c < 1:
      raise ConfigError(f'model.attention.options.num_clusters={c!r} is invalid: a positive '
                        'integer')
    if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
      raise ConfigError(f'model.attention.options.decay={decay!r} is invalid: a number in '
                        '[0, 1) (EMA decay of the centroids)')
    if unused.get('causal') and c > 1:
      raise ConfigError(f'model.attention.options.num_clusters={c} is invalid for a causal layer: '
                        'top-w routing ranks each token against the whole sequence, so later '
                        'tokens would change earlier outputs; causal routing needs '
                        'num_clusters=1 (use C > 1 in bidirectional encoders)')
    if rngs is None:
      raise ValueError('RoutingAttention initialises its centroids from rngs')
    del dtype, param_dtype, unused
    self.num_clusters, self.decay = c, float(decay)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.dropout_rate = cfg.dropout
    self.centroids = Centroids(
        jax.random.normal(rngs.params(), (num_heads, c, head_dim), jnp.float32),
        out_sharding=('heads', None, 'head_dim'), eager_sharding=False)

  def assignments(self, q: jax.Array, k: jax.Array, mask: AttentionMask | None):
    """(query indices [B, N, C, W_q], key indices [B, N, C, W_k]) of each cluster."""
    q_hat, k_hat, q_seg, k_seg = self._prepare(q, k, AttentionMask() if mask is None else mask)
    mu = self.centroids[...]
    return (route(closeness(q_hat, mu, q_seg != 0), self.num_clusters),
            route(closeness(k_hat, mu, k_seg != 0), self.num_clusters))

  def _prepare(self, q, k, mask: AttentionMask):
    """Normalised q^ [B, T, N, H], k^ [B, S, N, H] and segment ids [B, T], [B, S] (0 = pad)."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    q_seg = (jnp.ones((b, t), jnp.int32) if mask.q_segment_ids is None
             else jnp.broadcast_to(mask.q_segment_ids, (b, t)))
    k_seg = (jnp.ones((b, s), jnp.int32) if mask.kv_segment_ids is None
             else jnp.broadcast_to(mask.kv_segment_ids, (b, s)))
    k_heads = jnp.repeat(k, n // k.shape[2], axis=2)  # query head n reads kv head n // G
    return normalize(q), normalize(k_heads), q_seg, k_seg

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
               bias=None, deterministic: bool = True, dropout_rng: jax.Array | None = None,
               **unused) -> jax.Array:
    mask = AttentionMask() if mask is None else mask
    if bias is not None or mask.extra is not None or mask.window is not None:
      raise ValueError('routing attention takes segment ids, positions and causality only: '
                       'a bias, window or extra mask is refused')
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    query_groups(n, kv_heads)
    if not deterministic and self.dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError('attention dropout is active (deterministic=False, '
                       f'model.attention.dropout={self.dropout_rate}) but no dropout_rng was given')
    g, c = n // kv_heads, self.num_clusters
    q_hat, k_hat, q_seg, k_seg = self._prepare(q, k, mask)
    q_valid, k_valid = q_seg != 0, k_seg != 0
    mu = self.centroids[...]
    q_score, k_score = closeness(q_hat, mu, q_valid), closeness(k_hat, mu, k_valid)
    iq, ik = route(q_score, c), route(k_score, c)

    def per_cluster(x, idx):  # x [B, N, L, ...] -> [B * N * C, w, ...]
      y = _gather(x, idx)
      return y.reshape(b * n * c, *y.shape[3:])

    def tokens(x, length):  # [B|1, L] -> [B, N, L]
      return jnp.broadcast_to(x[:, None], (b, n, length))

    def heads(x):  # [B, L, N, H] -> [B, N, L, 1, H], one head per cluster row
      return jnp.moveaxis(x, 2, 1)[..., None, :]

    q_pos, k_pos = mask.positions(t, s)
    cluster_mask = AttentionMask(
        q_segment_ids=per_cluster(tokens(q_seg, t), iq),
        kv_segment_ids=per_cluster(tokens(k_seg, s), ik),
        q_positions=per_cluster(tokens(q_pos, t), iq),
        kv_positions=per_cluster(tokens(k_pos, s), ik), causal=mask.causal)
    kn, vn = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    out = dot_product_attention(
        per_cluster(heads(q), iq), per_cluster(heads(kn), ik), per_cluster(heads(vn), ik),
        cluster_mask, scale=self.scale,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng)
    out = out.reshape(b, n, c, -1, h).astype(jnp.float32)
    out = jnp.moveaxis(_scatter_mean(out, iq, t), 1, 2).astype(q.dtype)
    if not deterministic:
      self._update_centroids(q_score, k_score, q_hat, k_hat, q_valid, k_valid)
    return out

  def _update_centroids(self, q_score, k_score, q_hat, k_hat, q_valid, k_valid) -> None:
    """EMA of each centroid toward the mean of the real tokens whose nearest centroid it is."""
    c = self.num_clusters

    def assigned(score, valid):  # one-hot nearest centroid [B, N, L, C], zero for padding
      nearest = jax.nn.one_hot(jnp.argmax(score, axis=2), c, dtype=jnp.float32)
      return nearest * valid[:, None, :, None]

    aq, ak = assigned(q_score, q_valid), assigned(k_score, k_valid)
    total = jnp.einsum('BNLC,BLNH->NCH', aq, q_hat) + jnp.einsum('BNLC,BLNH->NCH', ak, k_hat)
    count = jnp.sum(aq, axis=(0, 2)) + jnp.sum(ak, axis=(0, 2))  # [N, C]
    mu = self.centroids[...]
    mean = total / jnp.maximum(count, 1.0)[..., None]
    new = jnp.where(count[..., None] > 0, self.decay * mu + (1.0 - self.decay) * mean, mu)
    self.centroids[...] = jax.lax.stop_gradient(new)
