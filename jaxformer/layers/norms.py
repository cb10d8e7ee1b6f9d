"""Normalization layers (CATALOG D1).

LayerNorm (Ba et al., 2016):  y = (x - mean(x)) / sqrt(var(x) + eps) * g + b
RMSNorm   (Zhang & Sennrich, 2019; LLaMA, T5):  y = x / sqrt(mean(x^2) + eps) * g
ScaleNorm (Nguyen & Salazar, 2019):  y = g * x / max(||x||_2, eps), one scalar g = sqrt(d) at init

Statistics are computed in float32 whatever the input dtype. RMSNorm follows HF LLaMA / Mixtral
exactly: normalise in float32, cast to the compute dtype, then multiply by the scale (so bf16
models round where HF rounds). LayerNorm and ScaleNorm apply the scale in float32 and cast last.
`dtype=None` keeps the input dtype. Scale and bias carry the logical axis 'embed' so they shard
like the model dimension.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig, check_choice
from jaxformer.layers.base import ones, param, zeros


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis. Params: `scale` [D], `bias` [D] (None when use_bias=False)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=None):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, ones, (dim,), ('embed',), param_dtype)
    self.bias = param(rngs, zeros, (dim,), ('embed',), param_dtype) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (HF LLaMA / T5 semantics). Params: `scale` [D]."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=None):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, ones, (dim,), ('embed',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return y.astype(dtype) * self.scale[...].astype(dtype)


class ScaleNorm(nnx.Module):
  """ScaleNorm: one learned scalar `scale` (shape [], init sqrt(d)) times the unit-norm vector."""

  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=None):
    self.eps = eps
    self.dtype = dtype
    g0 = math.sqrt(dim)
    self.scale = param(rngs, lambda key, shape, dt: jnp.full(shape, g0, dt), (), (), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = self.scale[...].astype(jnp.float32) * x32 / jnp.maximum(norm, self.eps)
    return y.astype(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None, *, rngs: nnx.Rngs
              ) -> LayerNorm | RMSNorm | ScaleNorm:
  """The norm named by `cfg.norm` with `cfg.norm_eps`; `dim` defaults to `cfg.d_model`.

  `cfg.norm_bias` only applies to LayerNorm (RMSNorm and ScaleNorm have no bias).
  """
  check_choice('model.norm', cfg.norm, ('layernorm', 'rmsnorm', 'scalenorm'))
  dim = cfg.d_model if dim is None else dim
  kw = dict(eps=cfg.norm_eps, rngs=rngs, param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype)
  if cfg.norm == 'layernorm':
    return LayerNorm(dim, use_bias=cfg.norm_bias, **kw)
  if cfg.norm == 'rmsnorm':
    return RMSNorm(dim, **kw)
  return ScaleNorm(dim, **kw)
