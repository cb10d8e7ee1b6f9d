"""Linformer (Wang et al. 2020, eq. 7): softmax attention over k projected keys and values.

    head = softmax(s * Q (E^T K)^T) (F^T V),   E, F: [L, k],   L = max_length

Shapes: B batch, T query length, S key length (S <= L; a shorter sequence uses the first S rows
of E and F), N query heads, K kv heads, H head dim, J the k projected rows. The projections mix
the sequence axis: E^T K is [B, k, K, H], so memory and time are O(n k) instead of O(n^2).
Grouped-query heads (N a multiple of K) read their kv head's projected keys and values.

Sharing (sec. 4, "parameter sharing"): 'headwise' (default) one E and one F per layer shared by
all heads; 'kv' one matrix E = F per layer; 'none' separate E_h, F_h per kv head.
Init: 'xavier' (fairseq's Linformer: xavier-uniform with gain 1/sqrt(2)) or 'normal'
(std 1/sqrt(k)).

Padding: keys and values with segment id 0 are zeroed before the projection, so their content
never reaches any output; queries with segment id 0 return 0. Packed sequences (several non-zero
segment ids in one row) are not isolated from each other: every projected row sums over the
whole row. Causal masking, sliding windows, additive biases and Shaw terms are indexed by key
position, which the projection removes, so they are refused at build time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError, check_choice
from jaxformer.layers import base

SHARING = ('headwise', 'kv', 'none')
INITS = ('xavier', 'normal')
_BY_POSITION = 'the projection mixes all key positions into k rows, so there is no key position '


@registry.register('linformer', 'xla', unsupported={
    'segments': 'the sequence projection mixes every key of a row, so packed examples would '
                'see each other',
    'causal': 'Linformer projects the whole sequence onto k rows, so position t would see the '
              'future',
    'decode': 'E^T K changes with every new token, so there is no incremental KV cache; '
              'Linformer is a bidirectional (encoder) kind',
    'window': _BY_POSITION + 'left to restrict to a band',
    'bias': _BY_POSITION + 'left for a [T, S] additive bias (ALiBi, T5) to index',
    'shaw': _BY_POSITION + 'left for relative-position key/value terms to index',
    'weights': 'the probabilities are over k projected rows, not over keys: there is no [T, S] '
               'attention map to sow',
})
class LinformerAttention(nnx.Module):
  """Linformer core; options `k` (64), `sharing` ('headwise'), `init` ('xavier').

  The projections are the parameters `e` and `f` ([L, k], or [K, L, k] for sharing='none';
  `f` is None for sharing='kv').
  """

  features = frozenset({'padding', 'cross', 'dropout', 'softcap'})
  example_options = {'k': 4}
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None,
               max_length: int | None = None, **unused):
    opts = registry.options(cfg, {'k': 64, 'sharing': 'headwise', 'init': 'xavier'})
    del dtype, unused
    check_choice('model.attention.options.sharing', opts['sharing'], SHARING)
    check_choice('model.attention.options.init', opts['init'], INITS)
    k = opts['k']
    if not isinstance(k, int) or k < 1:
      raise ConfigError(f'model.attention.options.k={k!r} is invalid: a positive integer (the '
                        'number of projected key/value rows)')
    if max_length is None:
      raise ConfigError('model.attention.kind=linformer needs max_length (model.max_length): '
                        'the projections E, F are [max_length, k]')
    if rngs is None:
      raise ValueError('LinformerAttention has parameters and needs rngs')
    self.max_length, self.k, self.sharing = max_length, k, opts['sharing']
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap
    self.dropout_rate = cfg.dropout
    if self.sharing == 'none':
      shape, names = (num_kv_heads, max_length, k), ('kv_heads', 'position', None)
    else:
      shape, names = (max_length, k), ('position', None)
    if opts['init'] == 'xavier':
      init = nnx.initializers.variance_scaling(
          0.5, 'fan_avg', 'uniform', in_axis=-2, out_axis=-1,
          batch_axis=tuple(range(len(shape) - 2)))
    else:
      init = base.normal_init(1.0 / math.sqrt(k))
    param_dtype = param_dtype or jnp.float32
    # A projection of the length axis, not a lookup table, although its first axis is 'position'.
    self.e = base.param(rngs, init, shape, names, param_dtype, role='weight')
    self.f = (None if self.sharing == 'kv' else
              base.param(rngs, init, shape, names, param_dtype, role='weight'))

  def _project(self, x: jax.Array, w: nnx.Param) -> jax.Array:
    """x [B, S, K, H] -> [B, k, K, H] with the first S rows of w."""
    s = x.shape[1]
    w = w[...].astype(x.dtype)
    if self.sharing == 'none':
      return jnp.einsum('BSKH,KSJ->BJKH', x, w[:, :s])
    return jnp.einsum('BSKH,SJ->BJKH', x, w[:s])

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
               bias=None, deterministic: bool = True, dropout_rng: jax.Array | None = None,
               **unused) -> jax.Array:
    mask = AttentionMask() if mask is None else mask
    if mask.causal or mask.window is not None or mask.extra is not None or bias is not None:
      raise ValueError('linformer attention takes only segment ids: a causal, windowed, extra '
                       'or bias mask is indexed by key position, which the projection removes')
    s = k.shape[1]
    if s > self.max_length:
      raise ValueError(f'linformer: sequence of {s} keys is longer than max_length='
                       f'{self.max_length}, the number of rows of the projections E, F')
    if not deterministic and self.dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError('attention dropout is active (deterministic=False, '
                       f'model.attention.dropout={self.dropout_rate}) but no dropout_rng was given')
    if mask.kv_segment_ids is not None:
      keep = (mask.kv_segment_ids != 0)[:, :, None, None]
      k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
    kp = self._project(k, self.e)
    vp = self._project(v, self.e if self.f is None else self.f)
    out = dot_product_attention(
        q, kp, vp, None, scale=self.scale, logit_softcap=self.logit_softcap,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng)
    if mask.q_segment_ids is not None:
      out = jnp.where((mask.q_segment_ids != 0)[:, :, None, None], out, 0)
    return out
