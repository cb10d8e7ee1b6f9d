"""Decoder-only language model: GPT-2, LLaMA, Mistral, Mixtral are configurations of it (E3, E4).

    h_0 = embed(tokens) (+ absolute positions);  h_l = Layer_l(h_{l-1});  logits = head(norm(h_L))

Causal self-attention over segment ids (packed sequences) and per-token positions, and an
explicit, functional KV cache for incremental decoding (`init_cache`, then call with `cache=`).
"""

from __future__ import annotations

from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers.norms import make_norm
from jaxformer.models.common import LMHead, ModelOutput, TokenEmbedder, self_attention_inputs
from jaxformer.models.stack import Stack


class DecoderLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = TokenEmbedder(cfg, rngs=rngs)
    self.stack = Stack(cfg, cfg.num_layers, causal=True, rngs=rngs)
    self.final_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.head = LMHead(cfg, self.embedder.embed, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    if max_len > self.cfg.max_length:
      raise ConfigError(f'cache length {max_len} exceeds model.max_length={self.cfg.max_length}')
    return self.stack.init_cache(batch, max_len, dtype)

  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True) -> ModelOutput:
    """tokens [B, T] int -> ModelOutput(logits [B, T, V] float32, aux, cache).

    segment_ids [B, T]: 0 marks padding, equal ids attend to each other (packing).
    positions [B, T]: absolute positions (default: restart at 0 in every segment). With a
    cache, pass the positions of the new tokens; left-padded prompts use segment id 0.
    """
    positions, mask = self_attention_inputs(self.cfg, tokens, segment_ids, positions,
                                            causal=True, cache=cache)
    x = self.embedder(tokens, positions, deterministic=deterministic)
    x, cache, aux = self.stack(x, mask, cache=cache, token_ids=tokens,
                               deterministic=deterministic)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return ModelOutput(logits=self.head(x), aux=aux, cache=cache, hidden=x)
