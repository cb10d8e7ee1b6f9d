"""Attention entropy as a training metric (`train.entropy_metrics`, CATALOG I).

For the probabilities A [B, N, T, S] of one layer (maps.py), the entropy of query t of head n

    H[b, n, t] = - sum_s A[b, n, t, s] log A[b, n, t, s]    (nats; 0 log 0 = 0)

and the metric is its mean over the rows that attend to something (sum_s A > 0: padding queries,
whose rows are all zero, are left out) of every batch row and head. It ranges from 0 (every
query looks at one key) to log S (uniform attention); collapsing entropy is a known sign of
training instability (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing
Attention Entropy Collapse"). Logged per attention site and layer as
`attention_entropy/<site>/<layer>` (site as in maps.py, e.g. stack/self_attn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.analysis.maps import AttentionMap


def mean_entropy(weights: jax.Array) -> jax.Array:
  """weights [..., T, S] -> the mean entropy (nats) over the rows with mass, float32 scalar."""
  p = weights.astype(jnp.float32)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  rows = (jnp.sum(p, axis=-1) > 0).astype(jnp.float32)
  return jnp.sum(h * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def entropy_metrics(maps: dict[str, AttentionMap]) -> dict[str, jax.Array]:
  """{'attention_entropy/<site>/<layer>': mean entropy} for every site and layer."""
  out = {}
  for name, m in maps.items():
    for layer, w in zip(m.layers, m.weights):
      out[f'attention_entropy/{name}/{layer}'] = mean_entropy(w)
  return out
