"""The model as a function of its input token embeddings: the hook every analysis goes through.

For a token model with embedder `TokenEmbedder` (models/common.py) the token embeddings of the
source ids are e = s E[ids] [B, T, E] (s = sqrt(D) under `model.embed_scale`, E =
model.embed_width), before positions, token types, the embedding norm and dropout. The
functions here evaluate any model call with e replaced by e + delta:

    g(delta) = fn(model with e -> e + delta)

so that gradients (saliency, integrated gradients), attacks (FGSM, PGD) and adversarial training
see one differentiable function of delta [B, T, E] for every family, with positions kept fixed.
Which embedder reads the source is the family's `input_embedder` (models/registry.py): the
decoder's and encoder's `embedder`, the encoder-decoder's `enc_embedder` (decoder inputs are
kept as given). A family without one (ViT, Swin, the RNN seq2seq, an image Perceiver) is
refused with a `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models.common import EmbeddingDelta, TokenEmbedder


def input_embedder(model: nnx.Module) -> TokenEmbedder:
  """The `TokenEmbedder` of the model's source tokens; ConfigError when there is none."""
  cfg: ModelConfig = model.cfg
  path = cfg.family_spec.input_embedder
  embedder = model
  for part in (path or '').split('.') if path else ():
    embedder = getattr(embedder, part, None)
  if path is None or not isinstance(embedder, TokenEmbedder):
    raise ConfigError(
        f'model.family={cfg.family!r} has no token embeddings to differentiate or perturb '
        '(it reads images or embeds tokens itself): attributions, FGSM / PGD and adversarial '
        'training need a family with a TokenEmbedder input (decoder, encoder, '
        'encoder_decoder, ...)')
  return embedder


def token_embeddings(model: nnx.Module, ids: jax.Array) -> jax.Array:
  """e = s E[ids] [B, T, E] in float32: the values that `input_delta` shifts."""
  embedder = input_embedder(model)
  return embedder.embed(ids).astype(jnp.float32)


def delta_shape(model: nnx.Module, ids: jax.Array) -> tuple[int, int, int]:
  input_embedder(model)
  return tuple(ids.shape) + (model.cfg.embed_width,)


def embedding_function(model: nnx.Module, fn: Callable[[nnx.Module], Any]
                       ) -> Callable[[jax.Array], tuple[Any, nnx.State]]:
  """-> g(delta) = (fn(model'), state of model' after the call), model' = `model` with its source
  token embeddings shifted by delta [B, T, E].

  g is pure (model' is a copy merged inside it), so it can be differentiated, vmapped and
  jitted; a caller that wants the model's variables to advance (dropout counters) applies the
  returned state with `nnx.update`.
  """
  input_embedder(model)  # refuse early, outside any trace
  graphdef, state = nnx.split(model)

  def g(delta):
    m = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # fresh variables, this trace
    embedder = input_embedder(m)
    embedder.input_delta = EmbeddingDelta(delta)
    out = fn(m)
    embedder.input_delta = None
    return out, nnx.state(m)

  return g


def scalar_function(model: nnx.Module, fn: Callable[[nnx.Module], jax.Array]
                    ) -> Callable[[jax.Array], jax.Array]:
  """delta -> the float32 scalar fn(model') (see `embedding_function`), model state discarded."""
  g = embedding_function(model, fn)
  return lambda delta: jnp.asarray(g(delta)[0], jnp.float32)
