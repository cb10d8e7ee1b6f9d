"""Attention for RNN encoder-decoders (CATALOG A4, A5), the pre-Transformer baseline.

Shapes: B batch, S source length, Q query (decoder state) dim, C key (encoder state) dim,
A attention hidden dim. One decoder step attends over all encoder states h_1..h_S:

  Bahdanau et al. 2015 (additive), eq. 6:   e_j = v^T tanh(W s + U h_j)
  Luong et al. 2015 (multiplicative), eq. 8:
    dot      e_j = s^T h_j
    general  e_j = s^T W h_j
    concat   e_j = v^T tanh(W [s; h_j])
  scaled (dot / general) divides the score by sqrt(C) (Vaswani et al. 2017).

  alpha = softmax(e) over the visible keys, context = sum_j alpha_j h_j.

Both return (context [B, C], weights [B, S]); a row without any visible key gets zero weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.core import MASKED_LOGIT
from jaxformer.layers import base

LUONG_KINDS = ('dot', 'general', 'concat')


def _attend(scores: jax.Array, keys: jax.Array, mask: jax.Array | None):
  """Masked softmax over S and the weighted sum of keys [B, S, C]."""
  scores = scores.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, MASKED_LOGIT)
  weights = jax.nn.softmax(scores, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  context = jnp.einsum('BS,BSC->BC', weights.astype(keys.dtype), keys)
  return context, weights


class BahdanauAttention(nnx.Module):
  """Additive attention e_j = v^T tanh(W s + U h_j)."""

  def __init__(self, query_dim: int, key_dim: int, hidden: int, *, rngs: nnx.Rngs, init=None,
               param_dtype=jnp.float32):
    init = init or nnx.initializers.xavier_uniform()
    self.w = base.param(rngs, init, (query_dim, hidden), ('embed', 'mlp'), param_dtype)
    self.u = base.param(rngs, init, (key_dim, hidden), ('embed', 'mlp'), param_dtype)
    self.v = base.param(rngs, nnx.initializers.normal(hidden ** -0.5), (hidden,), ('mlp',),
                        param_dtype)

  def project_keys(self, keys: jax.Array) -> jax.Array:
    """U h_j [B, S, A]; depends only on the encoder, so decoders compute it once."""
    return jnp.einsum('BSC,CA->BSA', keys, self.u[...].astype(keys.dtype))

  def __call__(self, query: jax.Array, keys: jax.Array, mask: jax.Array | None = None, *,
               projected_keys: jax.Array | None = None):
    """query [B, Q], keys [B, S, C], mask [B, S] bool (True = visible)."""
    uh = self.project_keys(keys) if projected_keys is None else projected_keys
    ws = jnp.einsum('BQ,QA->BA', query, self.w[...].astype(query.dtype))
    e = jnp.einsum('BSA,A->BS', jnp.tanh(ws[:, None, :] + uh), self.v[...].astype(uh.dtype))
    return _attend(e, keys, mask)


class LuongAttention(nnx.Module):
  """Multiplicative attention: dot, general (s^T W h) or concat (v^T tanh(W [s; h]))."""

  def __init__(self, kind: str, query_dim: int, key_dim: int, *, scaled: bool = False,
               hidden: int | None = None, rngs: nnx.Rngs, init=None, param_dtype=jnp.float32):
    if kind not in LUONG_KINDS:
      raise ValueError(f'Luong attention kind {kind!r} is invalid: allowed values are '
                       f'{list(LUONG_KINDS)}')
    if kind == 'dot' and query_dim != key_dim:
      raise ValueError(f'Luong dot attention needs query_dim == key_dim, got {query_dim} and '
                       f'{key_dim}; use kind="general"')
    if scaled and kind == 'concat':
      raise ValueError('scaled=True applies to the dot and general scores, not to concat')
    self.kind, self.scaled, self.key_dim = kind, scaled, key_dim
    init = init or nnx.initializers.xavier_uniform()
    w = v = None
    if kind == 'general':
      w = base.param(rngs, init, (query_dim, key_dim), ('embed', 'mlp'), param_dtype)
    elif kind == 'concat':
      hidden = hidden or key_dim
      w = base.param(rngs, init, (query_dim + key_dim, hidden), ('embed', 'mlp'), param_dtype)
      v = base.param(rngs, nnx.initializers.normal(hidden ** -0.5), (hidden,), ('mlp',),
                     param_dtype)
    self.w, self.v = w, v

  def __call__(self, query: jax.Array, keys: jax.Array, mask: jax.Array | None = None):
    """query [B, Q], keys [B, S, C], mask [B, S] bool (True = visible)."""
    if self.kind == 'dot':
      e = jnp.einsum('BC,BSC->BS', query, keys)
    elif self.kind == 'general':
      e = jnp.einsum('BQ,QC,BSC->BS', query, self.w[...].astype(query.dtype), keys)
    else:
      s = jnp.broadcast_to(query[:, None, :], keys.shape[:2] + query.shape[-1:])
      hidden = jnp.tanh(jnp.einsum('BSI,IA->BSA', jnp.concatenate([s, keys], axis=-1),
                                   self.w[...].astype(query.dtype)))
      e = jnp.einsum('BSA,A->BS', hidden, self.v[...].astype(query.dtype))
    if self.scaled:
      e = e * self.key_dim ** -0.5
    return _attend(e, keys, mask)
