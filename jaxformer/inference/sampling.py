"""Token selection from next-token logits: greedy, temperature, top-k, top-p (CATALOG G).

All functions are pure, take logits [B, V] (computed in float32) and are applied in the order
of Hugging Face's `generate`:

    z = logits / tau;   z = topk_k(z);   z = topp_p(z);   y ~ softmax(z)

- temperature (Ackley et al. 1985; tau -> 0 is greedy): p_i ∝ exp(z_i / tau).
- top-k (Fan et al. 2018): keep exactly the k largest logits (ties broken by index), mask the
  rest with -inf.
- top-p / nucleus (Holtzman et al. 2020): sort by probability, keep the smallest prefix whose
  cumulative probability is >= p (token i is kept iff the mass strictly before it is < p), so the
  most likely token is always kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def greedy(logits: jax.Array) -> jax.Array:
  """argmax over V: [B, V] -> [B] int32 (lowest index on ties, as torch/numpy argmax)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  """z / tau for tau > 0."""
  if temperature <= 0:
    raise ValueError(f'temperature={temperature} is invalid: use > 0 (0 means greedy: call '
                     f'greedy or sample(temperature=0))')
  return logits.astype(jnp.float32) / temperature


def _keep(logits: jax.Array, order: jax.Array, keep_sorted: jax.Array) -> jax.Array:
  """Scatters a keep-mask given in `order` (indices [B, k]) back to vocabulary order."""
  rows = jnp.arange(logits.shape[0])[:, None]
  keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
  return jnp.where(keep, logits, NEG_INF)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps exactly the k largest logits of each row (k <= 0 or k >= V: unchanged)."""
  v = logits.shape[-1]
  if k <= 0 or k >= v:
    return logits
  _, idx = jax.lax.top_k(logits, k)
  return _keep(logits, idx, jnp.ones(idx.shape, bool))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest most-probable set with cumulative probability >= p (p >= 1: unchanged)."""
  if not 0.0 < p <= 1.0:
    raise ValueError(f'top_p={p} is invalid: use 0 < top_p <= 1')
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return _keep(logits, order, mass_before < p)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k, then top-p; removed tokens get -inf. Needs temperature > 0."""
  z = apply_temperature(logits, temperature)
  z = top_k_filter(z, top_k)
  return top_p_filter(z, top_p)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Draws one token per row: [B, V] -> [B] int32. temperature == 0 means greedy (key unused).

  The settings are Python values (static under jit): each combination compiles its own program.
  """
  if temperature < 0:
    raise ValueError(f'temperature={temperature} is invalid: use >= 0 (0 means greedy)')
  if temperature == 0:
    return greedy(logits)
  z = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
