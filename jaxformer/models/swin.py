"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows";
CATALOG D9, E6).

    x = LN(patches(img) W_p + b_p)                          [B, R_0^2, C_0], R_0 = image / patch
    stage s (width C_s = C_0 2^s, N_s heads, R_s = R_0 / 2^s, window w_s = min(W, R_s)):
      block i, shift o = 0 for even i, w_s // 2 for odd i (0 when R_s <= W):
        x = x + DropPath(roll_{+o}(merge(W-MSA(partition(roll_{-o}(LN(x)))))))
        x = x + DropPath(MLP(LN(x)))
      then, except after the last stage, patch merging (sec. 3.1):
        x = LN(concat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2])) W_r,
        W_r [4 C_s, 2 C_s] without bias, so R halves and the width doubles
    pooled = mean over the R^2 tokens of LN(x);   logits = pooled W_c + b_c

W-MSA (eq. 4): within each w x w window, Attention(Q, K, V) = softmax(Q K^T / sqrt(H) + B) V with
the relative position bias B[n, i, j] = T[(dy + w - 1)(2w - 1) + dx + w - 1, n], (dy, dx) = the
offset of patch i from patch j and T the learned table [(2w - 1)^2, N].

Shifted windows (sec. 3.2, "efficient batch computation"): the map is rolled by -o, cut into
windows as before and rolled back after attention. A window at the bottom or right edge then
holds patches from up to four regions that are not neighbours in the image; a patch attends only
to its own region. The regions are segment ids (1 + 3 r_y + r_x, with r = 0 below R - w, 1 in
[R - w, R - o), 2 from R - o), so the mask travels like every other mask in jaxformer, as ids,
and any `dot_product` impl with additive bias and segments applies it (the dense matrix is
never built outside the xla core). Hugging Face and the paper add -100 instead of -inf to the
masked logits; exp(-100) is below float32 resolution relative to a visible key, so the results
agree. Windows fold into the batch: the attention runs on [B * R^2 / w^2, w^2, C].

LayerNorm, MLP, residuals and DropPath act per patch (DropPath per image), so they run on the
[B, R^2, C] token map (row-major patches) and only attention sees windows.

Shapes: B batch, R map side, L = R^2 patches, C stage width, N heads, H = C / N head dim,
w window side, T = w^2 patches per window. Images are NHWC; a patch is flattened (row, column,
channel) as in ViT. Returns ModelOutput(logits = class logits, or the final normalised tokens
[B, L, C] without a classifier; hidden = those tokens; pooled = their mean).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ConfigError, ModelConfig, check_choice, fail
from jaxformer.layers.base import make_init, normal_init, param, tag_params, zeros
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.norms import make_norm
from jaxformer.models.block import SubLayer
from jaxformer.models.common import ModelOutput
from jaxformer.models.encoder import Classifier
from jaxformer.models.vit import embed_patches

# Impls of `dot_product` that take an additive bias and segment ids on the windows. The
# context-parallel ones split a long sequence over devices; a window is w^2 patches.
IMPLS = ('xla', 'chunked', 'pallas', 'cudnn', 'auto')


# --------------------------------------------------------------------------- geometry
def stage_heads(cfg: ModelConfig) -> tuple[int, ...]:
  sw = cfg.swin
  if sw.num_heads is not None:
    return tuple(sw.num_heads)
  return tuple(cfg.attention.num_heads * 2 ** s for s in range(len(sw.depths)))


def stage_geometry(cfg: ModelConfig, s: int) -> tuple[int, int]:
  """(R_s, w_s): the map side of stage s and its window side (the window is clipped to the map,
  as in the paper's code and Hugging Face, where a map no larger than a window is not shifted)."""
  r = cfg.image_size // cfg.patch_size // 2 ** s
  return r, min(cfg.swin.window_size, r)


def stage_config(cfg: ModelConfig, s: int) -> ModelConfig:
  """The ModelConfig of stage s's layers: width C_0 2^s, its heads, an MLP of mlp_ratio x width."""
  d = cfg.d_model * 2 ** s
  return dataclasses.replace(
      cfg, d_model=d, attention=dataclasses.replace(cfg.attention, num_heads=stage_heads(cfg)[s]),
      ffn=dataclasses.replace(cfg.ffn, hidden_dim=int(cfg.swin.mlp_ratio * d)))


def relative_position_index(w: int) -> np.ndarray:
  """[w^2, w^2]: (dy + w - 1)(2w - 1) + (dx + w - 1) for window patches i, j (row-major)."""
  yx = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing='ij')).reshape(2, -1)
  rel = yx[:, :, None] - yx[:, None, :] + (w - 1)
  return rel[0] * (2 * w - 1) + rel[1]


def partition(x: jax.Array, w: int) -> jax.Array:
  """[B, R, R, C] -> [B * (R / w)^2, w^2, C]: windows row-major, patches row-major in each."""
  return einops.rearrange(x, 'b (y p) (x q) c -> (b y x) (p q) c', p=w, q=w)


def unpartition(x: jax.Array, w: int, r: int) -> jax.Array:
  """The inverse of `partition`: [B * (R / w)^2, w^2, C] -> [B, R, R, C]."""
  return einops.rearrange(x, '(b y x) (p q) c -> b (y p) (x q) c', y=r // w, x=r // w, p=w, q=w)


def shift_segments(r: int, w: int, shift: int) -> np.ndarray:
  """[(R / w)^2, w^2] region ids (1..9) of the rolled map's windows: patches attend within one."""
  idx = np.arange(r)
  region = (idx >= r - w).astype(np.int32) + (idx >= r - shift)
  ids = 1 + 3 * region[:, None] + region[None, :]
  return np.asarray(partition(ids[None, :, :, None], w)[..., 0])


# --------------------------------------------------------------------------- layers
class SwinBlock(nnx.Module):
  """(S)W-MSA and an MLP, each inside `SubLayer` (norm position, residual dropout, DropPath)."""

  def __init__(self, cfg: ModelConfig, *, resolution: int, window: int, shift: int,
               rngs: nnx.Rngs):
    self.resolution, self.window, self.shift = resolution, window, shift
    self.attn = Attention(cfg, rngs=rngs)
    # Rows are relative positions: a table over positions, like T5's bucket embedding.
    self.relative_bias = param(rngs, normal_init(cfg.init_std), ((2 * window - 1) ** 2,
                                                                 cfg.num_heads),
                               ('position', 'heads'), cfg.params_dtype)
    self.attn_sub = SubLayer(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.ffn_sub = SubLayer(cfg, rngs=rngs)

  def position_bias(self) -> jax.Array:
    """B [1, N, T, T] from the table."""
    b = self.relative_bias[...][relative_position_index(self.window)]   # [T, T, N]
    return jnp.einsum('TSN->NTS', b)[None]

  def window_attention(self, h: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """h [B, L, C] (already normalised) -> [B, L, C]: attention within (shifted) windows."""
    b, _, c = h.shape
    r, w, o = self.resolution, self.window, self.shift
    g = h.reshape(b, r, r, c)
    if o:
      g = jnp.roll(g, (-o, -o), axis=(1, 2))
    mask = AttentionMask()
    if o:
      seg = jnp.tile(jnp.asarray(shift_segments(r, w, o)), (b, 1))   # [B * windows, T]
      mask = AttentionMask(q_segment_ids=seg, kv_segment_ids=seg)
    y, _ = self.attn(partition(g, w), mask, bias=self.position_bias(),
                     deterministic=deterministic)
    g = unpartition(y, w, r)
    if o:
      g = jnp.roll(g, (o, o), axis=(1, 2))
    return g.reshape(b, r * r, c)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    x = self.attn_sub(x, lambda h: self.window_attention(h, deterministic=deterministic),
                      deterministic=deterministic)
    return self.ffn_sub(x, lambda h: self.ffn(h, deterministic=deterministic),
                        deterministic=deterministic)


class PatchMerging(nnx.Module):
  """[B, R^2, C] -> [B, R^2 / 4, 2C]: each 2 x 2 group of patches concatenated (x0, x1, x2, x3 =
  (even row, even col), (odd, even), (even, odd), (odd, odd)), normalised, projected."""

  def __init__(self, cfg: ModelConfig, *, resolution: int, rngs: nnx.Rngs):
    c = cfg.d_model
    self.resolution = resolution
    self.dtype = cfg.compute_dtype
    self.norm = make_norm(cfg, 4 * c, rngs=rngs)
    self.reduction = param(rngs, make_init(cfg.init, cfg.init_std), (4 * c, 2 * c),
                           (None, 'embed'), cfg.params_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    r = self.resolution
    x = einops.rearrange(x, 'b (y p x q) c -> b (y x) (q p c)', y=r // 2, p=2, x=r // 2, q=2)
    return self.norm(x).astype(self.dtype) @ self.reduction[...].astype(self.dtype)


class Stage(nnx.Module):

  def __init__(self, cfg: ModelConfig, s: int, *, first_layer: int, drop_path: np.ndarray,
               rngs: nnx.Rngs):
    scfg = stage_config(cfg, s)
    r, w = stage_geometry(cfg, s)
    shift = w // 2 if r > cfg.swin.window_size else 0
    self.blocks = nnx.List([
        tag_params(SwinBlock(dataclasses.replace(scfg, drop_path=float(drop_path[i])),
                             resolution=r, window=w, shift=shift if i % 2 else 0, rngs=rngs),
                   layer=first_layer + i)
        for i in range(cfg.swin.depths[s])])
    last = s == len(cfg.swin.depths) - 1
    self.merge = None if last else PatchMerging(scfg, resolution=r, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = True):
    for block in self.blocks:
      x = block(x, deterministic=deterministic)
    return x if self.merge is None else self.merge(x)


class Swin(nnx.Module):
  """The Swin classifier (module docstring); `model.swin` holds depths, heads, window, MLP ratio."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
    self.patch_w = param(rngs, make_init(cfg.init, cfg.init_std), (p * p * c, d),
                         (None, 'embed'), cfg.params_dtype, role='embedding')
    self.patch_b = param(rngs, zeros, (d,), ('embed',), cfg.params_dtype, role='embedding')
    self.patch_norm = tag_params(make_norm(cfg, rngs=rngs), role='embedding')
    self.dropout = nnx.Dropout(cfg.embed_dropout, rngs=rngs)
    # Stochastic depth rising linearly over all blocks to model.drop_path (the paper's rule).
    depths = cfg.swin.depths
    rates = np.linspace(0.0, cfg.drop_path, sum(depths))
    starts = np.cumsum((0,) + tuple(depths))
    self.stages = nnx.List([
        Stage(cfg, s, first_layer=int(starts[s]), drop_path=rates[starts[s]:starts[s + 1]],
              rngs=rngs)
        for s in range(len(depths))])
    last = stage_config(cfg, len(depths) - 1)
    self.final_norm = make_norm(last, rngs=rngs) if cfg.final_norm else None
    self.classifier = Classifier(last, rngs=rngs) if cfg.num_labels else None

  def __call__(self, images, *, deterministic: bool = True) -> ModelOutput:
    """images [B, H, W, C] -> ModelOutput (module docstring)."""
    x = embed_patches(self.cfg, images, self.patch_w, self.patch_b)
    x = self.dropout(self.patch_norm(x), deterministic=deterministic)
    for stage in self.stages:
      x = stage(x, deterministic=deterministic)
    if self.final_norm is not None:
      x = self.final_norm(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    logits = (self.classifier(pooled, deterministic=deterministic)
              if self.classifier is not None else x)
    return ModelOutput(logits=logits, hidden=x, pooled=pooled)


# --------------------------------------------------------------------------- config check
def check_config(cfg: ModelConfig) -> None:
  """Config-time refusals for model.family='swin' (registered in models/registry.py)."""
  sw, a = cfg.swin, cfg.attention
  why = "for model.family='swin'"
  if not sw.depths or any(dep <= 0 for dep in sw.depths):
    fail('model.swin.depths', sw.depths, 'must be a non-empty sequence of positive block counts')
  if cfg.num_layers != sum(sw.depths):
    fail('model.num_layers', cfg.num_layers,
         f'must equal sum(model.swin.depths={tuple(sw.depths)}) = {sum(sw.depths)} {why}')
  if sw.num_heads is not None and (len(sw.num_heads) != len(sw.depths)
                                   or sw.num_heads[0] != a.num_heads):
    fail('model.swin.num_heads', sw.num_heads,
         f'must give one head count per stage ({len(sw.depths)}), the first equal to '
         f'model.attention.num_heads={a.num_heads} (or be None: doubling per stage)')
  if sw.window_size <= 0:
    fail('model.swin.window_size', sw.window_size, 'must be a positive integer')
  if sw.mlp_ratio <= 0:
    fail('model.swin.mlp_ratio', sw.mlp_ratio, 'must be > 0')
  check_choice('model.attention.kind', a.kind, ('dot_product',))
  if a.impl not in IMPLS:
    fail('model.attention.impl', a.impl,
         f'allowed values are {list(IMPLS)} {why}: it attends within windows of '
         'model.swin.window_size^2 patches folded into the batch, with an additive relative '
         'position bias and segment ids (shifted windows); there is no long sequence to '
         'split over devices')
  fixed = (('attention.window', a.window, None, 'the windows are 2-D, set by model.swin'),
           ('attention.num_kv_heads', a.num_kv_heads, None, 'the heads vary per stage'),
           ('attention.head_dim', a.head_dim, None, 'the head dim is the stage width / heads'),
           ('ffn.hidden_dim', cfg.ffn.hidden_dim, None, 'it is model.swin.mlp_ratio x width'),
           ('position.kind', cfg.position.kind, 'none',
            'positions are the relative bias of each window'),
           ('moe.num_experts', cfg.moe.num_experts, 0, 'Swin blocks have dense MLPs'),
           ('pooler', cfg.pooler, False, 'Swin average-pools the final patches (pooled)'))
  for field, value, allowed, reason in fixed:
    if value != allowed:
      fail(f'model.{field}', value, f'must be {allowed!r} {why}: {reason}')
  if cfg.image_size % cfg.patch_size:
    fail('model.patch_size', cfg.patch_size, f'must divide model.image_size={cfg.image_size}')
  for s in range(len(sw.depths)):
    scfg = stage_config(cfg, s)
    r, w = stage_geometry(cfg, s)
    if scfg.d_model % scfg.num_heads:
      fail('model.swin.num_heads', stage_heads(cfg),
           f'stage {s} has width {scfg.d_model}, which {scfg.num_heads} heads do not divide')
    if r < 1 or r % w or (s < len(sw.depths) - 1 and r % 2):
      raise ConfigError(
          f'model.image_size={cfg.image_size} is invalid for model.family=\'swin\' with '
          f'model.patch_size={cfg.patch_size}, model.swin.window_size={sw.window_size} and '
          f'{len(sw.depths)} stages: stage {s} has a {r} x {r} patch map, which must be a '
          f'multiple of its window ({w}) and, before patch merging, even (no padding)')
