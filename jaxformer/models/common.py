"""Input embedding and output head shared by every token model family (CATALOG C1, C2, D6).

TokenEmbedder: x = norm(scale * E[ids] + P[pos] + T[types]) then dropout, where the scale is
sqrt(D) when `model.embed_scale` (Vaswani et al.), P is the position kind's `embed` hook
(sinusoidal, or learned with an id offset for BART / RoBERTa; nothing for relative kinds) and
the norm is the embedding LayerNorm of BERT / BART (`model.embed_norm`). The tables and the norm
have width `model.embed_width` (`embed_dim`, else D); a family with `embed_projection` maps a
different width to D itself (ELECTRA). `input_delta` (None, or an `EmbeddingDelta` [B, T, E])
is added to scale * E[ids]: the one hook through which jaxformer.analysis differentiates and
perturbs the token embeddings of any family (attributions, FGSM / PGD, adversarial training).

LMHead: logits = softcap(scale * h E^T + b) with E tied to the input embedding, or an untied
projection; T5 scales by D^-0.5 when tied (`model.logits_scale`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxformer.attention.mask import AttentionMask
from jaxformer.config import ModelConfig
from jaxformer.layers import act_quant, peft, position_registry
from jaxformer.layers.base import check_token_ids, param, tag_params, zeros
from jaxformer.layers.embeddings import Embed, make_embed, make_head
from jaxformer.layers.norms import make_norm
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain


@struct.dataclass
class ModelOutput:
  """What every model returns. `aux` holds scalar auxiliary losses (MoE); `cache` the KV cache."""
  logits: jax.Array
  aux: dict = struct.field(default_factory=dict)
  cache: object = None
  hidden: jax.Array | None = None
  pooled: jax.Array | None = None


def default_positions(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Positions restarting at 0 in every packed segment (arange when not packed)."""
  if segment_ids is None:
    return jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
  seg = segment_ids
  start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  idx = jnp.broadcast_to(jnp.arange(length)[None], seg.shape)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return (idx - first).astype(jnp.int32)


def self_attention_inputs(cfg: ModelConfig, tokens, segment_ids, positions, *, causal: bool,
                          cache=None, what: str = 'sequence', prompt_length: int = 0):
  """Checks the length, fills in default positions -> (positions, AttentionMask).

  With a prompt of `prompt_length` P (prompt tuning, jaxformer/layers/peft.py), both describe
  [prompt; tokens] (only the tokens with a cache, which holds the prompt already).
  """
  b, t = tokens.shape
  if cache is None and t + prompt_length > cfg.max_length:
    raise ValueError(f'{what} length {t}' + (f' + a prompt of {prompt_length}' if prompt_length
                                             else '') +
                     f' exceeds model.max_length={cfg.max_length}')
  if positions is None:
    if cache is not None:
      raise ValueError('decoding with a cache needs explicit positions for the new tokens')
    positions = default_positions(segment_ids, b, t)
  if prompt_length:
    segment_ids, positions = peft.prompt_inputs(prompt_length, segment_ids, positions,
                                                cache=cache)
  mask = AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                       q_positions=positions, kv_positions=positions, causal=causal,
                       window=cfg.attention.window)
  return positions, mask


class EmbeddingDelta(nnx.Variable):
  """An additive perturbation of the token embeddings (jaxformer/analysis/inputs.py), never a
  parameter: it exists only while an analysis or an adversarial loss runs."""


class TokenEmbedder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, embed: Embed | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = embed if embed is not None else make_embed(cfg, rngs=rngs)
    self.position = position_registry.of(cfg)
    self.positions = self.position.embedding_params(rngs=rngs)  # the learned table, or None
    self.token_types = (Embed(cfg.type_vocab_size, cfg.embed_width, init_std=cfg.init_std,
                              param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype,
                              ids_name='token type ids', rngs=rngs)
                        if cfg.type_vocab_size else None)
    # Part of the input embedding: layer-wise LR decay treats it like the tables.
    self.norm = (tag_params(make_norm(cfg, cfg.embed_width, rngs=rngs), role='embedding')
                 if cfg.embed_norm else None)
    self.dropout = nnx.Dropout(cfg.embed_dropout, rngs=rngs)
    self.input_delta: EmbeddingDelta | None = nnx.data(None)

  def __call__(self, ids, positions, *, token_types=None, prompt=None, deterministic=True):
    """ids [B, T] -> [B, T, D]; with `prompt` (a `layers.peft.Prompt`, P vectors), [B, P + T, D]
    with the prompt in front of the token embeddings (`positions` and `token_types`, if given,
    are then [B, P + T] and [B, T])."""
    cfg = self.cfg
    check_token_ids(ids, cfg.vocab_size, 'input token ids')
    x = self.embed(ids).astype(cfg.compute_dtype)  # scaled by sqrt(D) when model.embed_scale
    if self.input_delta is not None:  # the tokens' own embeddings; a prompt is not shifted
      x = x + self.input_delta[...].astype(x.dtype)
    if prompt is not None:
      x = jnp.concatenate([prompt(x.shape[0], x.dtype), x], axis=1)
      if token_types is not None:
        token_types = jnp.pad(token_types, ((0, 0), (prompt.length, 0)))
      ids = jnp.pad(ids, ((0, 0), (prompt.length, 0)))
    absolute = self.position.embed(self.positions, positions)
    if absolute is not None:
      x = x + absolute.astype(x.dtype)
    if self.token_types is not None:
      tt = jnp.zeros_like(ids) if token_types is None else token_types
      x = x + self.token_types(tt).astype(x.dtype)
    if self.norm is not None:
      x = self.norm(x)
    x = self.dropout(x, deterministic=deterministic)
    return constrain(x, R.RESIDUAL)


class LMHead(nnx.Module):
  """Reads states of width `dim` (None: d_model; the MLM head of a factorized embedding reads
  model.embed_width)."""
  ACT_INPUTS = ('input',)  # jaxformer/layers/act_quant.py: the input of the tied or untied head

  def __init__(self, cfg: ModelConfig, embed: Embed, *, dim: int | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = embed if cfg.tie_embeddings else None
    # The vocabulary bias (BERT's decoder bias, BART's final_logits_bias) is kept separately so
    # that it exists for tied and untied heads alike.
    self.head = (None if cfg.tie_embeddings
                 else make_head(cfg.replace(head_bias=False), dim=dim, rngs=rngs))
    self.bias = (param(rngs, zeros, (cfg.vocab_size,), ('vocab',), cfg.params_dtype)
                 if cfg.head_bias else None)

  def __call__(self, h):
    cfg = self.cfg
    if cfg.logits_scale is not None:
      h = h * jnp.asarray(cfg.logits_scale, h.dtype)
    h = act_quant.quantize(self, 'input', h)
    logits = self.embed.attend(h) if self.head is None else self.head(h)
    logits = logits.astype(jnp.float32)
    if self.bias is not None:
      logits = logits + self.bias[...].astype(jnp.float32)
    if cfg.final_logit_softcap:
      c = cfg.final_logit_softcap
      logits = c * jnp.tanh(logits / c)
    return constrain(logits, R.LOGITS)
