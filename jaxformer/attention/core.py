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

import functools
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

  Computed head-major ([B, K, G, T, H]) with a hand-written backward (`_attend`), except when
  the probabilities leave the function (`return_weights`, `value_bias_fn`): then JAX
  differentiates the same forward, so gradients through the weights are exact too.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = query_groups(n, kh)
  scale = h ** -0.5 if scale is None else scale
  allowed = _grouped(mask.dense(t, s), kh) if mask is not None else None
  keep = None
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (b, kh, g, t, s))
  qh, kt, vt = _heads(q, kh), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  bias = _grouped(bias.astype(jnp.float32), kh) if bias is not None else None
  if not return_weights and value_bias_fn is None:
    out = _attend(qh, kt, vt, allowed, bias, keep, float(scale), logit_softcap, dropout_rate)
    return _unheads(out).astype(q.dtype)
  out, probs, _ = _forward(qh, kt, vt, allowed, bias, keep, scale, logit_softcap, dropout_rate)
  out = _unheads(out)
  weights = probs.reshape(b, n, t, s)
  if value_bias_fn is not None:
    dropped = _dropout(probs, keep, dropout_rate).reshape(b, n, t, s)
    out = out + value_bias_fn(dropped).astype(jnp.float32)
  out = out.astype(q.dtype)
  return (out, weights) if return_weights else out


def _heads(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, K, G, T, H]: query head n = k G + g (Hugging Face's `repeat_kv`)."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _unheads(x: jax.Array) -> jax.Array:
  """[B, K, G, T, H] -> [B, T, N, H]."""
  b, kh, g, t, h = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h)


def _grouped(x: jax.Array | None, kv_heads: int) -> jax.Array | None:
  """A mask or bias [B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, T|1, S|1]."""
  if x is None:
    return None
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _dropout(probs, keep, rate):
  return probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)


def _forward(qh, kt, vt, allowed, bias, keep, scale, softcap, rate):
  """(out [B, K, G, T, H] float32, probs [B, K, G, T, S], capped logits or None)."""
  z = jnp.einsum('BKGTH,BKSH->BKGTS', qh, kt, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    z = z + bias
  capped = None
  if softcap is not None:
    z = capped = softcap * jnp.tanh(z / softcap)
  if allowed is not None:
    z = jnp.where(allowed, z, MASKED_LOGIT)
  probs = jax.nn.softmax(z, axis=-1)
  if allowed is not None:
    probs = jnp.where(allowed, probs, 0.0)
  out = jnp.einsum('BKGTS,BKSH->BKGTH', _dropout(probs, keep, rate).astype(vt.dtype), vt,
                   preferred_element_type=jnp.float32)
  return out, probs, capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attend(qh, kt, vt, allowed, bias, keep, scale, softcap, rate):
  """Attention in head-major layout, differentiated by `_attend_bwd`.

  JAX's own transpose of the two einsums asks XLA for dK = dS^T Q with dS [B, K, G T, S]
  contracted over its middle axis, and XLA:CPU transposes the whole [G T, S] score gradient
  to get there (and the same for dV). The backward below contracts the small operands instead:
  dK^T = Q^T dS and dV^T = dO^T P, then transposes the [H, S] results. Same math, in
  docs/benchmarks.md 2.6x faster on CPU for the quickstart's shapes.
  """
  return _forward(qh, kt, vt, allowed, bias, keep, scale, softcap, rate)[0]


def _attend_fwd(qh, kt, vt, allowed, bias, keep, scale, softcap, rate):
  out, probs, capped = _forward(qh, kt, vt, allowed, bias, keep, scale, softcap, rate)
  return out, (qh, kt, vt, allowed, bias, keep, probs, out, capped)


def _attend_bwd(scale, softcap, rate, res, dout):
  """Softmax backward dZ = P (dP - rowsum(dO * O)); dP = dO V^T, through dropout's mask."""
  qh, kt, vt, allowed, bias, keep, probs, out, capped = res
  dout = dout.astype(jnp.float32)
  dropped = _dropout(probs, keep, rate)
  dv_t = jnp.einsum('BKGTH,BKGTS->BKHS', dout, dropped)
  dprobs = _dropout(jnp.einsum('BKGTH,BKSH->BKGTS', dout, vt,
                               preferred_element_type=jnp.float32), keep, rate)
  dz = probs * (dprobs - jnp.sum(dout * out, axis=-1, keepdims=True))
  if capped is not None:
    dz = dz * (1.0 - jnp.square(capped / softcap))
  dbias = None
  if bias is not None:
    summed = tuple(i for i in range(dz.ndim) if bias.shape[i] == 1 and dz.shape[i] != 1)
    dbias = jnp.sum(dz, axis=summed, keepdims=True).astype(bias.dtype)
  dz = dz * scale
  dq = jnp.einsum('BKGTS,BKSH->BKGTH', dz, kt, preferred_element_type=jnp.float32)
  dk_t = jnp.einsum('BKGTH,BKGTS->BKHS', qh, dz, preferred_element_type=jnp.float32)
  return (dq.astype(qh.dtype), dk_t.swapaxes(-1, -2).astype(kt.dtype),
          dv_t.swapaxes(-1, -2).astype(vt.dtype), None, dbias, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


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
    out = dot_product_attention(
        q, k, v, mask, bias=bias, scale=self.scale, logit_softcap=self.logit_softcap,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng,
        return_weights=self.sow_weights, value_bias_fn=value_bias_fn)
    if not self.sow_weights:
      return out
    out, probs = out
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
