"""RNN encoder-decoder with attention, the pre-Transformer baseline (CATALOG E7).

Encoder: a (bi)directional GRU/LSTM over embedded source tokens, h_1..h_S.
Decoder, Bahdanau et al. 2015 (attention from the previous state):
    c_t = attn(s_{t-1}, h);  s_t = cell([E y_{t-1}; c_t], s_{t-1});  o_t = W_o [s_t; c_t]
Decoder, Luong et al. 2015 (attention from the current state, dot / general / concat scores):
    s_t = cell(E y_{t-1}, s_{t-1});  c_t = attn(s_t, h);  o_t = W_o tanh(W_c [c_t; s_t])
Logits = o_t E^T (tied) or a projection. Padding in the source is masked in attention and
skipped by the encoder RNN (sequence lengths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.rnn_attention import BahdanauAttention, LuongAttention
from jaxformer.config import ModelConfig
from jaxformer.layers.base import check_token_ids, make_init, param, zeros
from jaxformer.layers.embeddings import Embed
from jaxformer.models.common import ModelOutput


def _cell(kind: str, din: int, dh: int, rngs: nnx.Rngs, param_dtype):
  cls = nnx.GRUCell if kind == 'gru' else nnx.LSTMCell
  cell = cls(din, dh, param_dtype=param_dtype, rngs=rngs)
  # flax's cells name no axes; name them all unsharded (None), as they are laid out today, so
  # that every parameter carries names (the optimizer reads its masks from them).
  for _, value in nnx.iter_graph(cell):
    if isinstance(value, nnx.Param):
      value.set_metadata(out_sharding=(None,) * value.ndim, eager_sharding=False)
  return cell


def _hidden(kind: str, carry):
  """The output state of a cell carry (LSTM carries (c, h))."""
  return carry[1] if kind == 'lstm' else carry


class _DecoderStep(nnx.Module):

  def __init__(self, cfg: ModelConfig, enc_dim: int, *, rngs: nnx.Rngs):
    r = cfg.rnn
    self.kind, self.attn_kind = r.cell, r.attention
    # The decoder state has the encoder's width, so that Luong's dot score is defined.
    d, dh = cfg.d_model, enc_dim
    init = make_init(cfg.init, cfg.init_std)
    if r.attention == 'bahdanau':
      self.attn = BahdanauAttention(dh, enc_dim, dh, rngs=rngs)
      self.cell = _cell(r.cell, d + enc_dim, dh, rngs, cfg.params_dtype)
      self.out_w = param(rngs, init, (dh + enc_dim, d), ('mlp', 'embed'), cfg.params_dtype)
    else:
      self.attn = LuongAttention(r.attention.split('_', 1)[1], dh, enc_dim, rngs=rngs)
      self.cell = _cell(r.cell, d, dh, rngs, cfg.params_dtype)
      self.combine_w = param(rngs, init, (enc_dim + dh, dh), (None, 'mlp'), cfg.params_dtype)
      self.out_w = param(rngs, init, (dh, d), ('mlp', 'embed'), cfg.params_dtype)
    self.out_b = param(rngs, zeros, (d,), ('embed',), cfg.params_dtype)

  def __call__(self, carry, y_emb, enc, enc_valid):
    """One target step: (carry, y_emb [B, D]) -> (carry, output [B, D], weights [B, S])."""
    if self.attn_kind == 'bahdanau':
      ctx, w = self.attn(_hidden(self.kind, carry), enc, enc_valid)
      carry, s = self.cell(carry, jnp.concatenate([y_emb, ctx], -1))
      o = jnp.concatenate([s, ctx], -1) @ self.out_w[...]
    else:
      carry, s = self.cell(carry, y_emb)
      ctx, w = self.attn(s, enc, enc_valid)
      o = jnp.tanh(jnp.concatenate([ctx, s], -1) @ self.combine_w[...]) @ self.out_w[...]
    return carry, o + self.out_b[...], w


class RNNSeq2Seq(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    r = cfg.rnn
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                       param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype, rngs=rngs)
    fwd = nnx.RNN(_cell(r.cell, cfg.d_model, r.hidden_dim, rngs, cfg.params_dtype), rngs=False)
    if r.bidirectional_encoder:
      bwd = nnx.RNN(_cell(r.cell, cfg.d_model, r.hidden_dim, rngs, cfg.params_dtype), rngs=False)
      self.encoder = nnx.Bidirectional(fwd, bwd, rngs=False)
      enc_dim = 2 * r.hidden_dim
    else:
      self.encoder = fwd
      enc_dim = r.hidden_dim
    self.bridge_w = param(rngs, make_init(cfg.init, cfg.init_std), (enc_dim, enc_dim),
                          (None, 'mlp'), cfg.params_dtype)
    self.step = _DecoderStep(cfg, enc_dim, rngs=rngs)

  def encode(self, tokens, *, segment_ids=None):
    """-> (encoder states [B, S, 2H|H], valid [B, S] bool, initial decoder carry)."""
    check_token_ids(tokens, self.cfg.vocab_size, 'source token ids')
    valid = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
    lengths = valid.sum(-1).astype(jnp.int32)
    b, dh = tokens.shape[0], self.cfg.rnn.hidden_dim
    zero = jnp.zeros((b, dh), self.cfg.compute_dtype)
    carry0 = (zero, zero) if self.cfg.rnn.cell == 'lstm' else zero
    if self.cfg.rnn.bidirectional_encoder:
      carry0 = (carry0, carry0)
    enc = self.encoder(self.embed(tokens), initial_carry=carry0, seq_lengths=lengths)
    enc = jnp.where(valid[..., None], enc, 0.0)
    mean = enc.sum(1) / jnp.maximum(lengths, 1)[:, None].astype(enc.dtype)
    h0 = jnp.tanh(mean @ self.bridge_w[...])
    carry = (jnp.zeros_like(h0), h0) if self.cfg.rnn.cell == 'lstm' else h0
    return enc, valid, carry

  def decode(self, tokens, enc, enc_valid, carry):
    """Teacher-forced decoding of target inputs [B, T] -> (logits [B, T, V], carry, weights)."""
    check_token_ids(tokens, self.cfg.vocab_size, 'target token ids')
    graphdef, state = nnx.split(self.step)

    def body(carry, y):
      step = nnx.merge(graphdef, state)
      carry, o, w = step(carry, y, enc, enc_valid)
      return carry, (o, w)

    y = jnp.swapaxes(self.embed(tokens), 0, 1)
    carry, (o, w) = jax.lax.scan(body, carry, y)
    o, w = jnp.swapaxes(o, 0, 1), jnp.swapaxes(w, 0, 1)
    return self.embed.attend(o).astype(jnp.float32), carry, w

  def __call__(self, encoder_inputs, decoder_inputs, *, encoder_segment_ids=None,
               decoder_segment_ids=None, deterministic: bool = True, **unused) -> ModelOutput:
    enc, valid, carry = self.encode(encoder_inputs, segment_ids=encoder_segment_ids)
    logits, _, weights = self.decode(decoder_inputs, enc, valid, carry)
    return ModelOutput(logits=logits, aux={}, hidden=weights)
