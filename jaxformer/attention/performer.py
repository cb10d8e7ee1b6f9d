"""Performer FAVOR+ attention (Choromanski et al. 2021), kind 'performer'.

The softmax kernel exp(x . y) is estimated with positive random features (Lemma 1):

    exp(x . y) = E_w[phi(x) . phi(y)],   phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),   W [m, H]

with x = q * scale^(1/2), y = k * scale^(1/2) (scale = H^-1/2 by default, i.e. the data are
scaled by H^-1/4), so phi(q) . phi(k) estimates exp(scale q . k). The rows of W are orthogonal
random features (sec. 2.4): blocks Q of a QR decomposition of H x H Gaussian matrices, each row
rescaled by an independent chi(H)-distributed norm so that it is marginally Gaussian; with
`orthogonal=False` W is i.i.d. Gaussian. Attention then follows the linear-attention forms of
linear.py: out_t = phi(q_t) . sum_s phi(k_s) v_s^T / phi(q_t) . sum_s phi(k_s), over all keys
(bidirectional) or over s <= t (causal, chunked prefix sums; decoding carries the sums).

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim,
M = m random features. Numerical stability: a query's features are divided by exp(max_M of its
exponent) (it cancels between numerator and denominator); keys share one shift per row and kv
head, the running maximum over the keys seen so far, and the carried sums are rescaled when it
grows, exactly as an online softmax does. Shifts are held out of differentiation.

W is an `nnx.Variable` of its own type (`RandomFeatures`), not a Param: it is not trained. With
`redraw='every_step'` a call with deterministic=False draws a fresh W from the 'features' (or
default) stream of the rngs given at construction, as the paper's feature redrawing does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import query_groups
from jaxformer.attention.linear import NEG, UNSUPPORTED, kernel_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError

REDRAW = ('never', 'every_step')


class RandomFeatures(nnx.Variable):
  """The Performer projection W [M, H]; redrawn, never trained."""


def random_projection(key: jax.Array, num_features: int, dim: int,
                      orthogonal: bool = True) -> jax.Array:
  """W [M, H]: Gaussian rows, or orthogonal blocks with chi(H)-distributed row norms."""
  if not orthogonal:
    return jax.random.normal(key, (num_features, dim), jnp.float32)
  blocks = -(-num_features // dim)
  block_key, norm_key = jax.random.split(key)
  gauss = jax.random.normal(block_key, (blocks, dim, dim), jnp.float32)
  q, r = jnp.linalg.qr(gauss)
  # Fixing the signs by diag(R) makes Q Haar-distributed; a raw Householder Q is not, and its
  # rows would bias the estimator.
  q = q * jnp.sign(jnp.diagonal(r, axis1=1, axis2=2))[:, None, :]
  rows = jnp.swapaxes(q, 1, 2).reshape(blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32), axis=1)
  return rows * norms[:, None]


def softmax_exponent(x: jax.Array, w: jax.Array) -> jax.Array:
  """W x - |x|^2 / 2 for x [..., H] (float32) -> [..., M]."""
  x = x.astype(jnp.float32)
  return jnp.einsum('...H,MH->...M', x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


@registry.register('performer', unsupported=UNSUPPORTED)
class PerformerAttention(nnx.Module):
  """FAVOR+ attention with positive orthogonal random features (see module docstring).

  Options (`model.attention.options`): `num_features` m (default 256), `orthogonal` (True),
  `redraw` ('never' | 'every_step': a new W on every call with deterministic=False),
  `chunk_size` (64) of the causal prefix-sum form.
  """

  features = frozenset({'causal', 'padding', 'segments', 'decode', 'cross'})
  example_options = {'num_features': 16, 'chunk_size': 4}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'num_features': 256, 'orthogonal': True, 'redraw': 'never',
                                  'chunk_size': 64})
    del dtype, param_dtype, unused
    if opts['redraw'] not in REDRAW:
      raise ConfigError(f'model.attention.options.redraw={opts["redraw"]!r} is invalid: allowed '
                        f'values are {list(REDRAW)}')
    for name in ('num_features', 'chunk_size'):
      if int(opts[name]) < 1:
        raise ConfigError(f'model.attention.options.{name} must be >= 1, got {opts[name]}')
    query_groups(num_heads, num_kv_heads)
    if rngs is None:
      raise ValueError('the performer core draws its random features from rngs; pass nnx.Rngs')
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.num_features, self.chunk_size = int(opts['num_features']), int(opts['chunk_size'])
    self.orthogonal, self.redraw = bool(opts['orthogonal']), opts['redraw']
    scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.data_scale = math.sqrt(scale)
    self.feature_rngs = rngs['features'].fork() if self.redraw == 'every_step' else nnx.data(None)
    self.projection = RandomFeatures(random_projection(
        rngs.params(), self.num_features, head_dim, self.orthogonal))

  def init_state(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """Empty sums {'s': [B, K, M, H], 'z': [B, K, M]} and key shift {'shift': [B, K]}, fp32."""
    del max_len, dtype
    k, m = self.num_kv_heads, self.num_features
    return {'s': jnp.zeros((batch, k, m, self.head_dim), jnp.float32),
            'z': jnp.zeros((batch, k, m), jnp.float32),
            'shift': jnp.full((batch, k), NEG, jnp.float32)}

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, state: dict | None = None, **unused):
    del bias, dropout_rng, unused  # refused features
    if not deterministic and self.redraw == 'every_step':
      self.projection[...] = random_projection(self.feature_rngs(), self.num_features,
                                               self.head_dim, self.orthogonal)
    w = self.projection[...]
    mask = AttentionMask() if mask is None else mask
    b, t, n, h = q.shape
    root_m = math.sqrt(self.num_features)

    eq = softmax_exponent(q * self.data_scale, w)
    fq = jnp.exp(eq - jax.lax.stop_gradient(eq.max(-1, keepdims=True))) / root_m
    fq = fq.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, self.num_features)

    def key_features(k, valid):
      ek = softmax_exponent(k * self.data_scale, w)  # [B, C, K, M]
      live = valid[:, :, None, None]
      shift = jax.lax.stop_gradient(jnp.max(jnp.where(live, ek, NEG), axis=(1, 3)))
      ek = jnp.where(live, ek, shift[:, None, :, None])
      return jnp.exp(ek - shift[:, None, :, None]) * live / root_m, shift

    res = kernel_attention(fq, k, v, mask, key_features, feature_dim=self.num_features,
                           chunk_size=self.chunk_size, state=state)
    out, new_state = res if state is not None else (res, None)
    out = out.reshape(b, t, n, h).astype(q.dtype)
    return out if state is None else (out, new_state)
