"""The Transformer layer every family is built from (CATALOG D2, D3), and the Mamba layer (D10).

Residual structure by `model.norm_position` (Vaswani et al. 2017; Xiong et al. 2020; Ding et al.
2021 for sandwich):
  pre:      h = x + drop(attn(norm(x)))
  post:     h = norm(x + drop(attn(x)))
  sandwich: h = x + drop(norm_out(attn(norm(x))))
and the same for the optional cross-attention and the feed-forward (dense or MoE). `drop` is
residual dropout followed by stochastic depth (DropPath). With `model.peft.adapter_dim`, the
sublayers named in `model.peft.adapter_sites` apply a bottleneck adapter to attn(.) / ffn(.)
right after it (Houlsby et al. 2019; jaxformer/layers/peft.py).

A Mamba layer (`MambaBlock`, Gu & Dao 2023) has the same wiring around the selective SSM
(`jaxformer.layers.mamba`) in place of attention, and an FFN sublayer only with `mamba.ffn`
(Jamba); `layer_mixer` says which layers of the 'mamba' family are which. Every block has one
call signature and returns (y, new cache, aux), so the shared stack runs either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ModelConfig, fail
from jaxformer.layers import position_registry
from jaxformer.layers.dropout import DropPath
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.mamba import Mamba
from jaxformer.layers.moe import MoE
from jaxformer.layers.norms import make_norm
from jaxformer.layers.peft import Adapter
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

ACT = R.RESIDUAL


def layer_mixer(cfg: ModelConfig, layer: int) -> str:
  """'attention' or 'mamba': the token mixer of layer `layer` (0-based) of a stack. A family
  whose registry `mixer` is 'mamba' is Mamba throughout, except every
  `mamba.attention_every`-th layer (hybrid stacks)."""
  if cfg.family_spec.mixer != 'mamba':
    return 'attention'
  k = cfg.mamba.attention_every
  return 'attention' if k and layer % k == k - 1 else 'mamba'


def check_mamba_config(cfg: ModelConfig) -> None:
  """What a Mamba stack cannot do, refused at config time (the registry's `check`)."""
  m = cfg.mamba
  if cfg.moe.num_experts and not m.ffn:
    fail('model.moe.num_experts', cfg.moe.num_experts,
         f"must be 0 for model.family={cfg.family!r} unless model.mamba.ffn=True: MoE replaces "
         'an FFN, and Mamba layers have none without it')
  if not m.attention_every:
    why = (f' for model.family={cfg.family!r} with model.mamba.attention_every=0, which has no '
           'attention layers')
    if position_registry.lookup(cfg.position.kind).acts_in_attention():
      fail('model.position.kind', cfg.position.kind,
           f'must be one of {position_registry.embedding_only()}{why} to apply it')
    if cfg.attention.kind != 'dot_product' or cfg.attention.impl not in ('xla', 'auto'):
      fail('model.attention.kind', cfg.attention.kind,
           f"must be 'dot_product' with impl 'xla' or 'auto'{why} to use it")


class SubLayer(nnx.Module):
  """norm / residual wiring around one mixing function (attention or FFN); `site` names it
  for `model.peft.adapter_sites`."""

  def __init__(self, cfg: ModelConfig, *, site: str | None = None, rngs: nnx.Rngs):
    self.position = cfg.norm_position
    self.adapter = (Adapter(cfg, rngs=rngs)
                    if cfg.peft.adapter_dim and site in cfg.peft.adapter_sites else None)
    self.norm = make_norm(cfg, rngs=rngs)
    self.out_norm = make_norm(cfg, rngs=rngs) if cfg.norm_position == 'sandwich' else None
    self.dropout = nnx.Dropout(cfg.residual_dropout, rngs=rngs)
    self.drop_path = DropPath(cfg.drop_path, rngs=rngs)

  def __call__(self, x, fn, *, deterministic: bool):
    h = fn(x if self.position == 'post' else self.norm(x))
    if self.adapter is not None:
      h = self.adapter(h)
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
    self.attn_sub = SubLayer(cfg, site='attention', rngs=rngs)
    if cross:
      self.cross_attn = Attention(cfg, cross=True, rngs=rngs)
      self.cross_sub = SubLayer(cfg, site='cross_attention', rngs=rngs)
    else:
      self.cross_attn = None
      self.cross_sub = None
    self.ffn = MoE(cfg, causal=causal, rngs=rngs) if moe else FeedForward(cfg, rngs=rngs)
    self.is_moe = moe
    self.ffn_sub = SubLayer(cfg, site='ffn', rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """{'self': the self-attention KV cache} (cross-attention K/V come from precompute_cross)."""
    return {'self': self.self_attn.init_cache(batch, max_len, dtype)}

  def __call__(self, x, mask: AttentionMask, *, bias=None, enc=None, enc_mask=None,
               cache=None, token_ids=None, deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new_cache, aux: dict of scalar losses)."""
    new_cache = {} if cache is not None else None
    self_fn = self_attention_fn(self.self_attn, mask, bias, cache, new_cache, deterministic)
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

    x, aux = ffn_sublayer(self, x, mask, token_ids, deterministic)
    return x, new_cache, aux


def self_attention_fn(attn, mask: AttentionMask, bias, cache, new_cache, deterministic: bool):
  """h -> the self-attention output for a SubLayer; a cached call reads cache['self'] and
  writes the layer's new KV cache into new_cache['self']."""

  def fn(h):
    y, c = attn(h, mask, bias=bias, cache=None if cache is None else cache['self'],
                deterministic=deterministic)
    if new_cache is not None:
      new_cache['self'] = c
    return checkpoint_name(y, 'attention_out')

  return fn


def ffn_sublayer(block, x, mask: AttentionMask, token_ids, deterministic: bool):
  """x + the block's FFN (dense or MoE) sublayer -> (x, aux losses)."""
  aux = {}

  def ffn_fn(h):
    if block.is_moe:
      valid = None if mask.q_segment_ids is None else mask.q_segment_ids != 0
      y, moe_aux = block.ffn(h, token_ids=token_ids, mask=valid, deterministic=deterministic)
      aux.update(moe_aux)
      return y
    return block.ffn(h, deterministic=deterministic)

  return constrain(block.ffn_sub(x, ffn_fn, deterministic=deterministic), ACT), aux


class MambaBlock(nnx.Module):
  """h = x + drop(mamba(norm(x))) (HF `MambaBlock` with pre-norm), then the FFN sublayer (dense
  or MoE) when `mamba.ffn`. Its cache is {'mamba': the layer's conv and SSM state}."""

  def __init__(self, cfg: ModelConfig, *, moe: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mixer = Mamba(cfg, rngs=rngs)
    self.mixer_sub = SubLayer(cfg, rngs=rngs)
    self.is_moe = moe
    if cfg.mamba.ffn:
      self.ffn = MoE(cfg, causal=True, rngs=rngs) if moe else FeedForward(cfg, rngs=rngs)
      self.ffn_sub = SubLayer(cfg, rngs=rngs)
    else:
      self.ffn = self.ffn_sub = None

  def init_cache(self, batch: int, max_len: int, dtype=None):
    del max_len  # the state does not grow with the sequence
    return {'mamba': self.mixer.init_cache(batch, dtype)}

  def __call__(self, x, mask: AttentionMask, *, bias=None, enc=None, enc_mask=None,
               cache=None, token_ids=None, deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new_cache, aux); `bias` / `enc` do not apply."""
    del bias, enc, enc_mask
    new_cache = {} if cache is not None else None

    def mix(h):
      y, c = self.mixer(h, mask.q_segment_ids, cache=None if cache is None else cache['mamba'])
      if new_cache is not None:
        new_cache['mamba'] = c
      return checkpoint_name(y, 'attention_out')

    x = constrain(self.mixer_sub(x, mix, deterministic=deterministic), ACT)
    if self.ffn is None:
      return x, new_cache, {}
    x, aux = ffn_sublayer(self, x, mask, token_ids, deterministic)
    return x, new_cache, aux


def zero_aux(cfg: ModelConfig) -> dict[str, jax.Array]:
  if cfg.moe.num_experts:
    return {'load_balance_loss': jnp.zeros((), jnp.float32),
            'router_z_loss': jnp.zeros((), jnp.float32)}
  return {}
