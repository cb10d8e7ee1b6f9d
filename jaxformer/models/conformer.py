"""The Conformer block (Gulati et al. 2020, sec. 2 and eq. 1), run by the shared stack.

    x' = x + 1/2 FFN(x)              macaron: two half-step feed-forward modules (Lu et al. 2019)
    x'' = x' + MHSA(x')              the shared `Attention`: any kind, any position kind
    x''' = x'' + Conv(x'')           layers/conv.py: pointwise, GLU, depthwise, LN, swish, pointwise
    y = LN(x''' + 1/2 FFN(x'''))
Each module is pre-norm with residual dropout (models/block.py `SubLayer`); the 1/2 scales the
FFN branch after its dropout (dropout and DropPath are linear, so the order does not matter).

The families `conformer` (a bidirectional encoder: classification and MLM heads of
models/encoder.py) and `conformer_lm` (a causal LM: models/decoder.py, with cached decoding)
are the encoder and decoder models with this block in their stack (`Family.block`), so scanned
layers, remat, pipelining and every attention kind work unchanged.

Relative positions: the paper uses Transformer-XL's relative sinusoidal encoding; here the
shared position kinds stand in for it (`model.position.kind`): 'rope' (the preset: a purely
relative query-key interaction that every projecting attention kind and cached decoding accept),
'shaw' (learned clipped relative key/value embeddings, dot-product attention) or 't5'.

Decoding cache per layer: {'self': the attention's KV cache, 'conv': the conv module's last
k - 1 inputs}. Shapes: B batch, T length, D model dim.
"""

from __future__ import annotations

from flax import nnx

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ModelConfig, fail
from jaxformer.layers.conv import ConvModule
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.norms import make_norm
from jaxformer.models.block import ACT, SubLayer, self_attention_fn
from jaxformer.parallel.sharding import constrain

CONV_NORMS = ('layernorm',)


def conv_is_causal(cfg: ModelConfig, causal_attention: bool) -> bool:
  c = cfg.conformer.causal
  return causal_attention if c is None else c


def check_config(cfg: ModelConfig) -> None:
  """The Conformer families' own fields and what their block cannot do (ConfigError)."""
  c = cfg.conformer
  fam = f'model.family={cfg.family!r}'
  if c.norm == 'batchnorm':
    fail('model.conformer.norm', c.norm,
         f"allowed values are {list(CONV_NORMS)}: BatchNorm's running statistics are state "
         'that training would have to update and checkpoint, and the trainer carries only '
         'parameters and fixed RNG streams (train/program.py `rest`), so they would stay at '
         'their initial values')
  if c.norm not in CONV_NORMS:
    fail('model.conformer.norm', c.norm, f'allowed values are {list(CONV_NORMS)}')
  if not isinstance(c.kernel_size, int) or c.kernel_size < 1:
    fail('model.conformer.kernel_size', c.kernel_size, 'must be a positive integer')
  causal = conv_is_causal(cfg, cfg.is_causal)
  if cfg.is_causal and not causal:
    fail('model.conformer.causal', c.causal,
         f'must be True or None for {fam}, whose attention is causal: a non-causal '
         'convolution would let position t read later tokens')
  if not causal and c.kernel_size % 2 == 0:
    fail('model.conformer.kernel_size', c.kernel_size,
         "must be odd for a non-causal ('same' padding) convolution, so that the window is "
         'centred on its position')
  if cfg.norm_position != 'pre':
    fail('model.norm_position', cfg.norm_position,
         f"must be 'pre' for {fam}: the Conformer block is pre-norm with a final LayerNorm")
  if cfg.moe.num_experts:
    fail('model.moe.num_experts', cfg.moe.num_experts,
         f'must be 0 for {fam}: the Conformer block has two dense half-step FFNs')
  if cfg.reversible:
    fail('model.reversible', True,
         f'must be False for {fam}: reversible layers pair one attention and one FFN branch, '
         'and the Conformer block has four residual branches and a final norm')


class ConformerBlock(nnx.Module):
  """See the module docstring. Takes the arguments of `TransformerBlock`; no cross-attention."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False, moe: bool = False,
               rngs: nnx.Rngs):
    if cross or moe:
      raise ValueError('the Conformer block has no cross-attention and no MoE')
    self.cfg = cfg
    self.ffn1 = FeedForward(cfg, rngs=rngs)
    self.ffn1_sub = SubLayer(cfg, rngs=rngs)
    self.self_attn = Attention(cfg, causal=causal, rngs=rngs)
    self.attn_sub = SubLayer(cfg, rngs=rngs)
    self.conv = ConvModule(cfg, causal=conv_is_causal(cfg, causal), rngs=rngs)
    self.conv_sub = SubLayer(cfg, rngs=rngs)
    self.ffn2 = FeedForward(cfg, rngs=rngs)
    self.ffn2_sub = SubLayer(cfg, rngs=rngs)
    self.out_norm = make_norm(cfg, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    return {'self': self.self_attn.init_cache(batch, max_len, dtype),
            'conv': self.conv.init_state(batch, dtype)}

  def __call__(self, x, mask: AttentionMask, *, bias=None, enc=None, enc_mask=None,
               cache=None, token_ids=None, deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new_cache, aux {})."""
    del enc, enc_mask, token_ids
    new_cache = {} if cache is not None else None
    half_ffn = lambda ffn: lambda h: 0.5 * ffn(h, deterministic=deterministic)  # noqa: E731

    attn_fn = self_attention_fn(self.self_attn, mask, bias, cache, new_cache, deterministic)

    def conv_fn(h):
      y, c = self.conv(h, mask.q_segment_ids, state=None if cache is None else cache['conv'])
      if new_cache is not None:
        new_cache['conv'] = c
      return y

    x = constrain(self.ffn1_sub(x, half_ffn(self.ffn1), deterministic=deterministic), ACT)
    x = constrain(self.attn_sub(x, attn_fn, deterministic=deterministic), ACT)
    x = constrain(self.conv_sub(x, conv_fn, deterministic=deterministic), ACT)
    x = self.ffn2_sub(x, half_ffn(self.ffn2), deterministic=deterministic)
    return constrain(self.out_norm(x).astype(x.dtype), ACT), new_cache, {}
