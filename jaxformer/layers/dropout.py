"""Dropout and stochastic depth (CATALOG D3).

Dropout (Srivastava et al. 2014): y = x * m / (1 - p), m ~ Bernoulli(1 - p) per element. Use
`nnx.Dropout` (re-exported here as `Dropout`) for embedding, attention-probability and residual
dropout: construct it with `rngs=rngs` so it forks its own 'dropout' stream (with rate 0 pass
`rngs=None`: no stream is needed), and call it as `dropout(x, deterministic=...)`; the flag
passed at call time wins over the constructor's.

DropPath / stochastic depth (Huang et al. 2016; Larsson et al. 2017 as used in ViT/Swin):
y = x * m_b / (1 - p), one m_b ~ Bernoulli(1 - p) per example b, so a whole residual branch is
dropped for that example. Apply it to the branch output before the residual addition.

Both are the identity when `deterministic=True` (evaluation) and keep E[y] = x in training.
Modules that hold RNG streams work with layers stacked by `nnx.vmap` under `nnx.split_rngs` and
run with `nnx.scan`: each layer owns a split key and the stream counters are scanned state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dropout = nnx.Dropout


class DropPath(nnx.Module):
  """Stochastic depth with per-example masks over axis `batch_axis` (default 0)."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None, batch_axis: int = 0,
               rng_collection: str = 'dropout'):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'DropPath rate={rate!r} is invalid: must be in [0, 1)')
    self.rate = rate
    self.batch_axis = batch_axis
    if rate > 0.0 and rngs is None:
      raise ValueError('DropPath with rate > 0 needs rngs (a "dropout" stream)')
    self.rngs = rngs[rng_collection].fork() if rate > 0.0 else nnx.data(None)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = [1] * x.ndim
    shape[self.batch_axis] = x.shape[self.batch_axis]
    mask = jax.random.bernoulli(self.rngs(), keep, tuple(shape))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
