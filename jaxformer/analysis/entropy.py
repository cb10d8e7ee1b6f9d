"""Attention and activation entropy as training metrics (`train.entropy_metrics`,
`train.activation_entropy`; CATALOG I).

For the probabilities A [B, N, T, S] of one layer (maps.py), the entropy of query t of head n

    H[b, n, t] = - sum_s A[b, n, t, s] log A[b, n, t, s]    (nats; 0 log 0 = 0)

and the metric is its mean over the rows that attend to something (sum_s A > 0: padding queries,
whose rows are all zero, are left out) of every batch row and head. It ranges from 0 (every
query looks at one key) to log S (uniform attention); collapsing entropy is a known sign of
training instability (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing
Attention Entropy Collapse"). Logged per attention site and layer as
`attention_entropy/<site>/<layer>` (site as in maps.py, e.g. stack/self_attn).

Activation entropy: for the hidden activation h [F] of a dense FFN at one token (the input of
its output matrix, after the nonlinearity and the gate), the entropy of how its magnitude
spreads over the F units,

    p_i = |h_i| / sum_j |h_j|,     H = - sum_i p_i log p_i    (nats; 0 log 0 = 0)

and the metric is its mean over the tokens with any activation (sum_j |h_j| > 0) of every batch
row (padding positions too: the FFN does not see the mask). It ranges from 0 (one unit carries
everything) to log F (every unit equally); a falling
value means the FFN's activity concentrates on fewer units (dead or saturated units, sparsity).
Logged per FFN site and layer as `activation_entropy/<site>/<layer>` (e.g. stack/ffn).
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


def mean_activation_entropy(h: jax.Array) -> jax.Array:
  """h [..., F] -> the mean over the rows with mass of the entropy of |h| / sum |h| (nats)."""
  a = jnp.abs(h.astype(jnp.float32))
  total = jnp.sum(a, axis=-1, keepdims=True)
  return mean_entropy(a / jnp.where(total > 0, total, 1.0))


def activation_metrics(hidden: dict[str, tuple[tuple[int, ...], jax.Array]]
                       ) -> dict[str, jax.Array]:
  """{'activation_entropy/<site>/<layer>': mean entropy} from maps.run_sowing's 'hidden'."""
  return {f'activation_entropy/{name}/{layer}': mean_activation_entropy(h)
          for name, (layers, values) in hidden.items() for layer, h in zip(layers, values)}
