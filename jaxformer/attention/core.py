"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1), the 'dot_product' / 'xla' core.

    Attention(Q, K, V) = softmax(cap(s * Q K^T + bias) masked) V,   cap(z) = c tanh(z / c)

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query heads
per kv head, H head dim. Multi-query (K = 1) and grouped-query attention (Ainslie et al. 2023)
reshape the queries to [B, T, K, G, H] instead of repeating keys and values: query head n reads
kv head n // G, the layout of Hugging Face's `repeat_kv`.

Scores and softmax are float32. Logit soft-capping (Gemma 2) applies to the scaled scores plus
any additive bias, before masking. Masked logits are replaced by a large finite negative number
and the probabilities of masked keys are then zeroed, so a query row with no visible key returns
exactly 0 with finite gradients. Dropout (inverted scaling) acts on the probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig

# The logit given to masked keys: large, negative and finite, so exp() underflows to 0 and
# differences of two masked logits stay finite (no NaN in softmax or its gradient).
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def query_groups(num_heads: int, num_kv_heads: int) -> int:
  """G = N / K, the query heads per kv head; fails naming both counts unless K divides N."""
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} key/value '
                     'heads')
  return num_heads // num_kv_heads


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: AttentionMask | None = None, *, bias: jax.Array | None = None,
                          scale: float | None = None, logit_softcap: float | None = None,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          return_weights: bool = False,
                          value_bias_fn: Callable[[jax.Array], jax.Array] | None = None):
  """Softmax attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H] in q.dtype.

  Args:
    mask: which keys each query sees (`AttentionMask.dense`), or None for all.
    bias: additive float bias [B|1, N|1, T, S] (ALiBi, T5, Shaw key term); must be finite.
    scale: multiplies q.k; default H ** -0.5.
    logit_softcap: c in c * tanh(z / c), or None.
    dropout_rate, dropout_rng: dropout on the probabilities; active when rate > 0 and a key is
      given.
    return_weights: also return the probabilities [B, N, T, S] (float32, before dropout).
    value_bias_fn: maps the (dropped-out) probabilities [B, N, T, S] to a term [B, T, N, H] that
      is added to the output; Shaw's sum_j p_ij a^V_ij.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = query_groups(n, kh)
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, g, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, n, t, s) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if logit_softcap is not None:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  allowed = mask.dense(t, s) if mask is not None else None
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1)
  if allowed is not None:
    probs = jnp.where(allowed, probs, 0.0)
  weights = probs
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.reshape(b, kh, g, t, s).astype(v.dtype), v,
                   preferred_element_type=jnp.float32).reshape(b, t, n, h)
  if value_bias_fn is not None:
    out = out + value_bias_fn(probs).astype(jnp.float32)
  out = out.astype(q.dtype)
  return (out, weights) if return_weights else out


@registry.register('dot_product', 'xla')
class DotProductAttention(nnx.Module):
  """Dense softmax attention core; supports every registry feature.

  Options (`model.attention.options`): `sow_weights` (bool) sows the probabilities
  [B, N, T, S] as `nnx.Intermediate` 'attention_weights' on every call; the attribute
  `sow_weights` (see `set_sow_weights`) turns it on after construction too.
  """

  features = registry.FEATURES

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    opts = registry.options(cfg, {'sow_weights': False})
    del dtype, param_dtype, rngs, unused  # no parameters; the caller owns the dropout stream
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap
    self.dropout_rate = cfg.dropout
    self.sow_weights = bool(opts['sow_weights'])

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, value_bias_fn=None):
    if not deterministic and self.dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError('attention dropout is active (deterministic=False, '
                       f'model.attention.dropout={self.dropout_rate}) but no dropout_rng was given')
    out, probs = dot_product_attention(
        q, k, v, mask, bias=bias, scale=self.scale, logit_softcap=self.logit_softcap,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng,
        return_weights=True, value_bias_fn=value_bias_fn)
    if self.sow_weights:
      self.sow(nnx.Intermediate, 'attention_weights', probs)
    return out


def set_sow_weights(model: nnx.Module, enabled: bool = True) -> int:
  """Turns sowing of attention probabilities on or off in every core of `model`.

  Collect them with `nnx.capture(fn, nnx.Intermediate)`; the values sit under
  '...attention_weights' next to each core. Returns how many modules were switched.
  """
  count = 0
  for _, m in nnx.iter_modules(model):
    if hasattr(m, 'sow_weights') and isinstance(m.sow_weights, bool):
      m.sow_weights = enabled
      count += 1
  return count
