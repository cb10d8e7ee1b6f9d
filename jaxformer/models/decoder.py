"""Decoder-only language model: GPT-2, LLaMA, Mistral, Mixtral are configurations of it (E3, E4).

    h_0 = embed(tokens) (+ absolute positions);  h_l = Layer_l(h_{l-1});  logits = head(norm(h_L))

Causal self-attention over segment ids (packed sequences) and per-token positions, and an
explicit, functional KV cache for incremental decoding (`init_cache`, then call with `cache=`).
With prompt tuning (`model.peft.prompt_length` P) the stack runs over [prompt; tokens] and the
logits of the prompt positions are dropped; `init_cache` runs the prompt into the first P cache
slots (a causal prompt does not depend on the tokens after it), and cached calls shift the
given positions by P.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers.peft import make_prompt
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
    self.prompt = make_prompt(cfg, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """A cache for `max_len` tokens (and, with prompt tuning, the prompt before them)."""
    p = self.prompt.length if self.prompt is not None else 0
    if max_len + p > self.cfg.max_length:
      raise ConfigError(f'cache length {max_len}' + (f' + a prompt of {p}' if p else '') +
                        f' exceeds model.max_length={self.cfg.max_length}')
    cache = self.stack.init_cache(batch, max_len + p, dtype)
    if p:
      cache = self._prefill_prompt(cache, batch)
    return cache

  def _prefill_prompt(self, cache, batch: int):
    """The cache with the prompt's keys and values in its first P slots."""
    p = self.prompt.length
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (batch, p))
    seg = jnp.ones((batch, p), jnp.int32)
    mask = AttentionMask(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                         kv_positions=pos, causal=True, window=self.cfg.attention.window)
    x = self.embedder(jnp.zeros((batch, 0), jnp.int32), pos, prompt=self.prompt)
    return self.stack(x, mask, cache=cache)[1]

  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True) -> ModelOutput:
    """tokens [B, T] int -> ModelOutput(logits [B, T, V] float32, aux, cache).

    segment_ids [B, T]: 0 marks padding, equal ids attend to each other (packing).
    positions [B, T]: absolute positions (default: restart at 0 in every segment). With a
    cache, pass the positions of the new tokens; left-padded prompts use segment id 0.
    """
    p = self.prompt.length if self.prompt is not None else 0
    positions, mask = self_attention_inputs(self.cfg, tokens, segment_ids, positions,
                                            causal=True, cache=cache, prompt_length=p)
    prompt = self.prompt if p and cache is None else None
    x = self.embedder(tokens, positions, prompt=prompt, deterministic=deterministic)
    ids = tokens if prompt is None else jnp.pad(tokens, ((0, 0), (p, 0)))  # MoE's token ids
    x, cache, aux = self.stack(x, mask, cache=cache, token_ids=ids, deterministic=deterministic)
    if prompt is not None:
      x = x[:, p:]
    if self.final_norm is not None:
      x = self.final_norm(x)
    return ModelOutput(logits=self.head(x), aux=aux, cache=cache, hidden=x)
