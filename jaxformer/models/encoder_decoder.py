"""Encoder-decoder: the original Transformer, T5 / T5 v1.1 and BART are configurations of it
(CATALOG E1, E5).

    m = Encoder(embed(src));  logits = head(Decoder(embed(tgt), cross=m))

The embedding table is shared by encoder, decoder and (when tied) the output head; absolute
positions and embedding norms are separate per side, as in BART. For decoding, `encode` runs
once, `init_cache` precomputes every layer's cross-attention K/V, and `decode` consumes one or
more target tokens at a time.

With prompt tuning (`model.peft.prompt_length` P) the prompt goes in front of the encoder's
tokens (Lester et al. 2021) and the encoder states keep its P positions, which the decoder
cross-attends to: `encode` returns [B, P + S, D] states and segment ids. Prefixes
(`model.peft.prefix_length`) sit in the self-attention of both stacks, not in cross-attention.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers.embeddings import make_embed
from jaxformer.layers.norms import make_norm
from jaxformer.layers.peft import make_prompt
from jaxformer.models.common import LMHead, ModelOutput, TokenEmbedder, self_attention_inputs
from jaxformer.models.stack import Stack


class EncoderDecoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shared = make_embed(cfg, rngs=rngs)
    self.enc_embedder = TokenEmbedder(cfg, embed=self.shared, rngs=rngs)
    self.dec_embedder = TokenEmbedder(cfg, embed=self.shared, rngs=rngs)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False, rngs=rngs)
    self.enc_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, rngs=rngs)
    self.dec_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.head = LMHead(cfg, self.shared, rngs=rngs)
    self.prompt = make_prompt(cfg, rngs=rngs)

  def encode(self, tokens, *, segment_ids=None, positions=None, deterministic: bool = True):
    """-> (encoder states [B, S, D], encoder segment ids [B, S] or None, aux); S includes the
    prompt with prompt tuning."""
    p = self.prompt.length if self.prompt is not None else 0
    positions, mask = self_attention_inputs(self.cfg, tokens, segment_ids, positions,
                                            causal=False, what='source', prompt_length=p)
    segment_ids = mask.q_segment_ids
    x = self.enc_embedder(tokens, positions, prompt=self.prompt, deterministic=deterministic)
    ids = jnp.pad(tokens, ((0, 0), (p, 0))) if p else tokens  # MoE's token ids
    x, _, aux = self.encoder(x, mask, token_ids=ids, deterministic=deterministic)
    if self.enc_norm is not None:
      x = self.enc_norm(x)
    return x, segment_ids, aux

  def init_cache(self, batch: int, max_len: int, enc, enc_segment_ids=None, dtype=None):
    if max_len > self.cfg.max_length:
      raise ConfigError(f'cache length {max_len} exceeds model.max_length={self.cfg.max_length}')
    cache = self.decoder.init_cache(batch, max_len, dtype)
    return self.decoder.precompute_cross(cache, enc, self._cross_mask(None, enc_segment_ids))

  @staticmethod
  def _cross_mask(dec_segment_ids, enc_segment_ids) -> AttentionMask:
    """Decoder queries see the encoder tokens of their own segment (padding = 0)."""
    return AttentionMask(q_segment_ids=dec_segment_ids, kv_segment_ids=enc_segment_ids)

  def decode(self, tokens, enc, *, enc_segment_ids=None, segment_ids=None, positions=None,
             cache=None, deterministic: bool = True) -> ModelOutput:
    positions, mask = self_attention_inputs(self.cfg, tokens, segment_ids, positions,
                                            causal=True, cache=cache, what='target')
    x = self.dec_embedder(tokens, positions, deterministic=deterministic)
    x, cache, aux = self.decoder(x, mask, enc=enc,
                                 enc_mask=self._cross_mask(segment_ids, enc_segment_ids),
                                 cache=cache, token_ids=tokens, deterministic=deterministic)
    if self.dec_norm is not None:
      x = self.dec_norm(x)
    return ModelOutput(logits=self.head(x), aux=aux, cache=cache, hidden=x)

  def __call__(self, encoder_inputs, decoder_inputs, *, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               deterministic: bool = True) -> ModelOutput:
    enc, enc_seg, enc_aux = self.encode(encoder_inputs, segment_ids=encoder_segment_ids,
                                        positions=encoder_positions, deterministic=deterministic)
    out = self.decode(decoder_inputs, enc, enc_segment_ids=enc_seg,
                      segment_ids=decoder_segment_ids, positions=decoder_positions,
                      deterministic=deterministic)
    aux = {k: out.aux[k] + enc_aux.get(k, 0.0) for k in out.aux}
    return out.replace(aux=aux)
