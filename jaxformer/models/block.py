"""The Transformer layer every family is built from (CATALOG D2, D3).

Residual structure by `model.norm_position` (Vaswani et al. 2017; Xiong et al. 2020; Ding et al.
2021 for sandwich):
  pre:      h = x + drop(attn(norm(x)))
  post:     h = norm(x + drop(attn(x)))
  sandwich: h = x + drop(norm_out(attn(norm(x))))
and the same for the optional cross-attention and the feed-forward (dense or MoE). `drop` is
residual dropout followed by stochastic depth (DropPath).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ModelConfig
from jaxformer.layers.dropout import DropPath
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.moe import MoE
from jaxformer.layers.norms import make_norm
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

ACT = R.RESIDUAL


class SubLayer(nnx.Module):
  """norm / residual wiring around one mixing function (attention or FFN)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.position = cfg.norm_position
    self.norm = make_norm(cfg, rngs=rngs)
    self.out_norm = make_norm(cfg, rngs=rngs) if cfg.norm_position == 'sandwich' else None
    self.dropout = nnx.Dropout(cfg.residual_dropout, rngs=rngs)
    self.drop_path = DropPath(cfg.drop_path, rngs=rngs)

  def __call__(self, x, fn, *, deterministic: bool):
    h = fn(x if self.position == 'post' else self.norm(x))
    if self.out_norm is not None:
      h = self.out_norm(h)
    h = self.drop_path(self.dropout(h, deterministic=deterministic), deterministic=deterministic)
    y = x + h.astype(x.dtype)
    return self.norm(y) if self.position == 'post' else y


class TransformerBlock(nnx.Module):
  """Self-attention, optional cross-attention, then a dense FFN or an MoE."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False, moe: bool = False,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.self_attn = Attention(cfg, causal=causal, rngs=rngs)
    self.attn_sub = SubLayer(cfg, rngs=rngs)
    if cross:
      self.cross_attn = Attention(cfg, cross=True, rngs=rngs)
      self.cross_sub = SubLayer(cfg, rngs=rngs)
    else:
      self.cross_attn = None
      self.cross_sub = None
    self.ffn = MoE(cfg, causal=causal, rngs=rngs) if moe else FeedForward(cfg, rngs=rngs)
    self.is_moe = moe
    self.ffn_sub = SubLayer(cfg, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """{'self': the self-attention KV cache} (cross-attention K/V come from precompute_cross)."""
    return {'self': self.self_attn.init_cache(batch, max_len, dtype)}

  def __call__(self, x, mask: AttentionMask, *, bias=None, enc=None, enc_mask=None,
               cache=None, token_ids=None, deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new_cache, aux: dict of scalar losses)."""
    new_cache = {} if cache is not None else None

    def self_fn(h):
      y, c = self.self_attn(h, mask, bias=bias, cache=None if cache is None else cache['self'],
                            deterministic=deterministic)
      if new_cache is not None:
        new_cache['self'] = c
      return checkpoint_name(y, 'attention_out')

    x = constrain(self.attn_sub(x, self_fn, deterministic=deterministic), ACT)

    if self.cross_attn is not None:
      def cross_fn(h):
        y, c = self.cross_attn(h, enc_mask, kv=enc,
                               cache=None if cache is None else cache.get('cross'),
                               deterministic=deterministic)
        if new_cache is not None and c is not None:
          new_cache['cross'] = c
        return y

      x = constrain(self.cross_sub(x, cross_fn, deterministic=deterministic), ACT)

    aux = {}

    def ffn_fn(h):
      if self.is_moe:
        valid = None if mask.q_segment_ids is None else mask.q_segment_ids != 0
        y, moe_aux = self.ffn(h, token_ids=token_ids, mask=valid, deterministic=deterministic)
        aux.update(moe_aux)
        return y
      return self.ffn(h, deterministic=deterministic)

    x = constrain(self.ffn_sub(x, ffn_fn, deterministic=deterministic), ACT)
    return x, new_cache, aux


def zero_aux(cfg: ModelConfig) -> dict[str, jax.Array]:
  if cfg.moe.num_experts:
    return {'load_balance_loss': jnp.zeros((), jnp.float32),
            'router_z_loss': jnp.zeros((), jnp.float32)}
  return {}
