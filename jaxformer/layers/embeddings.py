"""Token embeddings and output heads (CATALOG D6).

Embed:   e_t = E[id_t] * scale,  E [V, D] ('vocab', 'embed').  `scale` is sqrt(D) for the
         original Transformer (Vaswani et al. 2017, sec. 3.4) and Gemma, 1 otherwise;
         `make_embed` sets it from `cfg.embed_scale`. The scale applies to lookups only, never to
         the tied head.
Tied head (Press & Wolf 2017):   logits = x E^T            -> `Embed.attend`
Untied head:                     logits = x W + b, W [D, V] ('embed', 'vocab') -> `Head`
Init: normal(init_std) (GPT-2 / BERT, 0.02), xavier or lecun via `init`.
TokenTypeEmbed (BERT segment embeddings) is an Embed with V = cfg.type_vocab_size.

Ids are checked against the vocabulary when they are concrete (`check_token_ids`): an
out-of-range id raises ValueError naming the vocabulary size instead of being silently clipped
(what `jnp.take` would do). Under jit the values are abstract: such ids give NaN embeddings, and
the check is the caller's job at the input boundary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import check_token_ids, make_init, param, zeros
from jaxformer.layers.linear import dense, project
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain, embedding_lookup


class Embed(nnx.Module):
  """Lookup table `embedding` [V, D]; `__call__(ids) -> [..., D]`, `attend(x) -> [..., V]`."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, init_std: float = 0.02,
               init: str = 'normal', scale: float = 1.0, param_dtype=jnp.float32, dtype=None,
               ids_name: str = 'tokens'):
    self.vocab = vocab
    self.dim = dim
    self.scale = scale
    self.dtype = dtype
    self.ids_name = ids_name
    self.embedding = param(rngs, make_init(init, init_std, in_axis=-1, out_axis=-2),
                           (vocab, dim), ('vocab', 'embed'), param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    check_token_ids(ids, self.vocab, self.ids_name)
    table = self.embedding[...]
    dtype = self.dtype or table.dtype
    # Abstract (jitted) ids cannot raise: out-of-range ones (negative included) give NaN rows,
    # loud downstream, never a silently clipped or wrapped lookup. Vocab-parallel when the
    # active layout splits the vocabulary (jaxformer.parallel.sharding.embedding_lookup).
    x = embedding_lookup(table, ids).astype(dtype)
    if self.scale != 1.0:
      x = x * jnp.asarray(self.scale, dtype)
    return constrain(x, R.RESIDUAL)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head: x [..., D] -> logits x E^T [..., V] in the compute dtype."""
    dtype = self.dtype or x.dtype
    logits = dense(x.astype(dtype), self.embedding[...].astype(dtype).T)  # '...D,VD->...V'
    return constrain(logits, R.LOGITS)


TokenTypeEmbed = Embed


class Head(nnx.Module):
  """Untied output projection: `kernel` [D, V] ('embed', 'vocab'), optional `bias` [V]."""
  PROJECTIONS = ('kernel',)  # jaxformer/layers/linear.py `project`
  ACT_INPUTS = ()  # the LM head quantizes its input (models/common.py LMHead)

  def __init__(self, dim: int, vocab: int, *, bias: bool = False, rngs: nnx.Rngs,
               init_std: float = 0.02, init: str = 'normal', param_dtype=jnp.float32,
               dtype=None):
    self.dtype = dtype
    self.kernel = param(rngs, make_init(init, init_std), (dim, vocab), ('embed', 'vocab'),
                        param_dtype)
    self.bias = param(rngs, zeros, (vocab,), ('vocab',), param_dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    # '...D,DV->...V'
    logits = project(self, 'kernel', x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      logits = logits + self.bias[...].astype(dtype)
    return constrain(logits, R.LOGITS)


def make_embed(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Embed:
  """Token embedding from the config: width cfg.embed_width (embed_dim, else d_model),
  init/init_std, sqrt(width) scaling if cfg.embed_scale."""
  return Embed(cfg.vocab_size, cfg.embed_width, rngs=rngs, init_std=cfg.init_std, init=cfg.init,
               scale=math.sqrt(cfg.embed_width) if cfg.embed_scale else 1.0,
               param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype)


def make_head(cfg: ModelConfig, *, dim: int | None = None, rngs: nnx.Rngs) -> Head:
  """Untied output head from the config (bias per cfg.head_bias) reading width `dim` (None:
  d_model)."""
  return Head(cfg.d_model if dim is None else dim, cfg.vocab_size, bias=cfg.head_bias, rngs=rngs, init_std=cfg.init_std,
              init=cfg.init, param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype)
