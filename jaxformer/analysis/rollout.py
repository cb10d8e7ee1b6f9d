"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

With A_l [B, N, T, T] the self-attention probabilities of layer l = 1..L (maps.py):

    Abar_l = mean_n A_l                          (heads averaged)            [B, T, T]
    Ahat_l = rownorm((Abar_l + I) / 2)           (the residual path as identity)
    R      = Ahat_L Ahat_{L-1} ... Ahat_1        (R[b, t, s]: how much of input token s flows
                                                  into position t after the last layer)

rownorm divides each row by its sum. A row of (Abar + I) / 2 already sums to 1 when the query
attends to something; a padding query (an all-zero row of A) becomes the identity row, so
padding neither gains nor loses mass. Every row of R sums to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def residual_attention(weights: jax.Array) -> jax.Array:
  """Ahat for one layer: weights [B, N, T, T] -> rownorm((mean_n A + I) / 2) [B, T, T]."""
  t, s = weights.shape[-2:]
  if t != s:
    raise ValueError(f'rollout needs square self-attention maps, got [T, S] = [{t}, {s}]')
  a = 0.5 * (jnp.mean(weights.astype(jnp.float32), axis=1) + jnp.eye(t, dtype=jnp.float32))
  return a / jnp.sum(a, axis=-1, keepdims=True)


def attention_rollout(weights: jax.Array) -> jax.Array:
  """weights [L, B, N, T, T] (layers in order) -> R [B, T, T] = Ahat_L ... Ahat_1."""
  if weights.ndim != 5:
    raise ValueError(f'rollout needs maps [L, B, N, T, T], got shape {weights.shape}')
  hats = jax.vmap(residual_attention)(weights)

  def step(r, a):
    return jnp.einsum('BTS,BSU->BTU', a, r), None

  eye = jnp.broadcast_to(jnp.eye(hats.shape[-1], dtype=jnp.float32), hats.shape[1:])
  return jax.lax.scan(step, eye, hats)[0]
