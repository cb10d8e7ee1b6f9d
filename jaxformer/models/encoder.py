"""Bidirectional encoder: BERT, RoBERTa and ELECTRA's two halves are configurations of it
(CATALOG E2).

    e = LN(E[tokens] + P + T)  [B, T, E]      (embedding LayerNorm, width E = model.embed_width)
    h = Encoder(e W_e + b_e)   [B, T, D]      (W_e [E, D] only when E != D: ELECTRA's
                                               embeddings_project, Clark et al. 2020)
    MLM logits = LN(act(h W_t + b_t)) E^T + b  (W_t [D, E]; tied decoder, Devlin et al. 2019)
    RTD logit  = act(h W_d + b_d) w + c  [B, T] (ELECTRA's discriminator head: token replaced?)
    pooled = tanh(h_[CLS] W_p + b_p);  class logits = dropout(pooled) W_c + b_c

The embedder can be given (`embedder=`): ELECTRA's generator and discriminator share one.
With prompt tuning (`model.peft.prompt_length` P) the stack runs over [prompt; tokens] and the
heads read the token positions only (so [CLS] is still position 0 of the output).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import make_init, param, zeros
from jaxformer.layers.ffn import activation
from jaxformer.layers.norms import make_norm
from jaxformer.layers.peft import make_prompt
from jaxformer.models.common import LMHead, ModelOutput, TokenEmbedder, self_attention_inputs
from jaxformer.models.stack import Stack
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain


class Dense(nnx.Module):
  """y = x W + b with logical names (used by heads; the layers use their own projections)."""

  def __init__(self, din: int, dout: int, cfg: ModelConfig, *, names=('embed', 'mlp'),
               rngs: nnx.Rngs):
    self.w = param(rngs, make_init(cfg.init, cfg.init_std), (din, dout), names, cfg.params_dtype)
    self.b = param(rngs, zeros, (dout,), names[1:], cfg.params_dtype)
    self.dtype = cfg.compute_dtype

  def __call__(self, x):
    return (x.astype(self.dtype) @ self.w[...].astype(self.dtype)
            + self.b[...].astype(self.dtype))


class Pooler(nnx.Module):
  """tanh(h_0 W + b) on the first ([CLS]) token."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.d_model, cfg.d_model, cfg, names=('embed', 'mlp'), rngs=rngs)

  def __call__(self, h):
    return jnp.tanh(self.dense(h[:, 0]))


class Classifier(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(cfg.residual_dropout, rngs=rngs)
    self.dense = Dense(cfg.d_model, cfg.num_labels, cfg, names=('embed', None), rngs=rngs)

  def __call__(self, pooled, *, deterministic=True):
    return self.dense(self.dropout(pooled, deterministic=deterministic)).astype(jnp.float32)


class MLMHead(nnx.Module):

  def __init__(self, cfg: ModelConfig, embed, *, rngs: nnx.Rngs):
    self.act = cfg.ffn.activation
    e = cfg.embed_width
    self.transform = Dense(cfg.d_model, e, cfg, names=('embed', 'mlp'), rngs=rngs)
    self.norm = make_norm(cfg, e, rngs=rngs)
    self.decoder = LMHead(cfg, embed, dim=e, rngs=rngs)

  def __call__(self, h):
    return self.decoder(self.norm(activation(self.act)(self.transform(h))))


class RTDHead(nnx.Module):
  """ELECTRA's discriminator head: a logit per token that it was replaced, [B, T] float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.act = cfg.ffn.activation
    self.dense = Dense(cfg.d_model, cfg.d_model, cfg, names=('embed', 'mlp'), rngs=rngs)
    self.prediction = Dense(cfg.d_model, 1, cfg, names=('mlp', None), rngs=rngs)

  def __call__(self, h):
    return self.prediction(activation(self.act)(self.dense(h)))[..., 0].astype(jnp.float32)


class EncoderModel(nnx.Module):
  """Returns MLM logits when `model.mlm_head`, replaced-token logits [B, T] when
  `model.rtd_head`, else class logits when `model.num_labels`, else the final hidden states, in
  `ModelOutput.logits`; `pooled` holds the pooler output."""

  def __init__(self, cfg: ModelConfig, *, embedder: TokenEmbedder | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = embedder if embedder is not None else TokenEmbedder(cfg, rngs=rngs)
    self.embed_proj = (Dense(cfg.embed_width, cfg.d_model, cfg, names=('embed', 'mlp'),
                             rngs=rngs) if cfg.embed_width != cfg.d_model else None)
    self.stack = Stack(cfg, cfg.num_layers, causal=False, rngs=rngs)
    self.final_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.mlm = MLMHead(cfg, self.embedder.embed, rngs=rngs) if cfg.mlm_head else None
    self.rtd = RTDHead(cfg, rngs=rngs) if cfg.rtd_head else None
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.pooler else None
    self.classifier = Classifier(cfg, rngs=rngs) if cfg.num_labels else None
    self.prompt = make_prompt(cfg, rngs=rngs)

  def __call__(self, tokens, *, segment_ids=None, positions=None, token_types=None,
               deterministic: bool = True) -> ModelOutput:
    p = self.prompt.length if self.prompt is not None else 0
    positions, mask = self_attention_inputs(self.cfg, tokens, segment_ids, positions,
                                            causal=False, prompt_length=p)
    x = self.embedder(tokens, positions, token_types=token_types, prompt=self.prompt,
                      deterministic=deterministic)
    if self.embed_proj is not None:
      x = constrain(self.embed_proj(x), R.RESIDUAL)
    ids = jnp.pad(tokens, ((0, 0), (p, 0))) if p else tokens  # MoE's token ids
    x, _, aux = self.stack(x, mask, token_ids=ids, deterministic=deterministic)
    x = x[:, p:]
    if self.final_norm is not None:
      x = self.final_norm(x)
    pooled = self.pooler(x) if self.pooler is not None else None
    if self.mlm is not None:
      logits = self.mlm(x)
    elif self.rtd is not None:
      logits = self.rtd(x)
    elif self.classifier is not None:
      logits = self.classifier(pooled if pooled is not None else x[:, 0],
                               deterministic=deterministic)
    else:
      logits = x
    return ModelOutput(logits=logits, aux=aux, hidden=x, pooled=pooled)
