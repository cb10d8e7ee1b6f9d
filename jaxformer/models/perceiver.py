"""Perceiver (Jaegle et al. 2021; CATALOG B15): a small latent array reads a long input.

    z_0 = Z (learned, [N_l, D]);   x = embed(inputs) [B, T, D]
    repeat r = 1..R:
      z = z + CrossAttn(norm(z), norm(x))      queries: latents, keys / values: inputs
      z = z + MLP(norm(z))
      z = LatentTransformer_r(z)               model.num_layers self-attention layers on z
    logits = W_c mean_n(norm(z)_n)             (the paper's average over latents)

The cross-attention costs O(T N_l D) and everything after it O(N_l^2 D + N_l D F) per layer, so
the depth runs at a cost independent of the input length T (the test compares compiled FLOP
counts for T = 64 .. 512). With `model.perceiver.share_weights` the repeats after the first use
one shared cross-attention and one shared latent Transformer (the paper's recurrent form); else
each repeat has its own weights.

Inputs (`model.perceiver.inputs`):
  tokens  ids [B, T] (+ segment_ids [B, T], 0 = padding, whose keys are masked so padded
          content never changes the output), embedded with `model.position` (learned or
          sinusoidal, or none) as in the other token models.
  pixels  images [B, H, W, C]: each `model.patch_size`^2 patch (1: the paper's single pixels)
          is an input element; its values are concatenated with Fourier features of its centre
          (y, x) in [-1, 1]: [c, sin(pi f_k c), cos(pi f_k c)], f_k = linspace(1, H / 2, bands)
          (sec. 3.2, Nyquist at the image size), then projected to D.

Shapes: B batch, T inputs, N_l latents, D = model.d_model (latents and embedded inputs share it),
F ffn dim, R repeats. Returns ModelOutput(logits [B, num_labels], hidden = latents [B, N_l, D],
pooled = the averaged latents).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers import position_registry
from jaxformer.layers.base import make_init, normal_init, param, zeros
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.norms import make_norm
from jaxformer.models.block import SubLayer, zero_aux
from jaxformer.models.common import ModelOutput, TokenEmbedder, default_positions
from jaxformer.models.encoder import Classifier
from jaxformer.models.stack import Stack


def fourier_features(size: int, patch: int, bands: int) -> jax.Array:
  """[(size / patch)^2, 2 (2 bands + 1)] features of the patch centres, row-major."""
  n = size // patch
  centres = (jnp.arange(n) + 0.5) * patch / size * 2.0 - 1.0          # in [-1, 1]
  yx = jnp.stack(jnp.meshgrid(centres, centres, indexing='ij'), -1).reshape(-1, 2)
  freqs = jnp.linspace(1.0, size / 2.0, bands)
  angles = jnp.pi * yx[:, :, None] * freqs                              # [P, 2, bands]
  feats = jnp.concatenate([yx[:, :, None], jnp.sin(angles), jnp.cos(angles)], -1)
  return feats.reshape(n * n, 2 * (2 * bands + 1))


class CrossBlock(nnx.Module):
  """Latents attend to the inputs (`model.perceiver.cross_heads` heads), then an MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    heads = cfg.perceiver.cross_heads
    cross_cfg = cfg.replace(attention=dataclasses.replace(
        cfg.attention, num_heads=heads, num_kv_heads=None, head_dim=None, window=None))
    self.attn = Attention(cross_cfg, cross=True, rngs=rngs)
    self.kv_norm = make_norm(cfg, rngs=rngs)
    self.attn_sub = SubLayer(cfg.replace(norm_position='pre'), rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.ffn_sub = SubLayer(cfg.replace(norm_position='pre'), rngs=rngs)

  def __call__(self, z, x, mask: AttentionMask, *, deterministic: bool = True):
    kv = self.kv_norm(x)
    z = self.attn_sub(z, lambda h: self.attn(h, mask, kv=kv, deterministic=deterministic)[0],
                      deterministic=deterministic)
    return self.ffn_sub(z, lambda h: self.ffn(h, deterministic=deterministic),
                        deterministic=deterministic)


class Perceiver(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pc = cfg.perceiver
    if position_registry.lookup(cfg.position.kind).acts_in_attention():
      raise ConfigError(f'model.position.kind={cfg.position.kind!r} is invalid for '
                        "model.family='perceiver': allowed values are "
                        f'{position_registry.embedding_only()} (positions are added to the '
                        'inputs; latents have none)')
    if not cfg.num_labels:
      raise ConfigError("model.num_labels=0 is invalid for model.family='perceiver': it is a "
                        'classifier and needs the number of classes')
    self.cfg = cfg
    d = cfg.d_model
    self.latents = param(rngs, normal_init(cfg.init_std), (pc.num_latents, d), (None, 'embed'),
                         cfg.params_dtype)
    if pc.inputs == 'tokens':
      self.embedder = TokenEmbedder(cfg, rngs=rngs)
      self.pixel_w = self.pixel_b = None
    else:
      if cfg.image_size % cfg.patch_size:
        raise ConfigError(f'model.patch_size={cfg.patch_size} is invalid: it must divide '
                          f'model.image_size={cfg.image_size}')
      self.embedder = None
      width = cfg.patch_size ** 2 * cfg.num_channels + 2 * (2 * pc.fourier_bands + 1)
      self.pixel_w = param(rngs, make_init(cfg.init, cfg.init_std), (width, d), (None, 'embed'),
                           cfg.params_dtype)
      self.pixel_b = param(rngs, zeros, (d,), ('embed',), cfg.params_dtype)
    shared = pc.share_weights
    num_cross = min(pc.num_repeats, 2) if shared else pc.num_repeats
    num_stacks = 1 if shared else pc.num_repeats
    self.cross = nnx.List([CrossBlock(cfg, rngs=rngs) for _ in range(num_cross)])
    self.stacks = nnx.List([Stack(cfg, cfg.num_layers, causal=False, rngs=rngs)
                            for _ in range(num_stacks)])
    self.final_norm = make_norm(cfg, rngs=rngs)
    self.classifier = Classifier(cfg, rngs=rngs)

  def embed(self, inputs, segment_ids=None, *, deterministic: bool = True):
    """-> (x [B, T, D], cross-attention mask with the padding of the inputs)."""
    cfg = self.cfg
    if self.embedder is not None:
      if inputs.ndim != 2:
        raise ValueError(f"model.perceiver.inputs='tokens' needs ids [B, T], got shape "
                         f'{inputs.shape}')
      b, t = inputs.shape
      positions = default_positions(segment_ids, b, t)
      x = self.embedder(inputs, positions, deterministic=deterministic)
      valid = (jnp.ones((b, t), jnp.int32) if segment_ids is None
               else (segment_ids != 0).astype(jnp.int32))
    else:
      b, h, w, c = inputs.shape
      if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
        raise ValueError(f'images of shape {(h, w, c)} do not match model.image_size='
                         f'{cfg.image_size} and model.num_channels={cfg.num_channels} (NHWC)')
      dt = cfg.compute_dtype
      p = cfg.patch_size
      patches = einops.rearrange(inputs, 'b (h p) (w q) c -> b (h w) (p q c)', p=p, q=p)
      pos = fourier_features(h, p, cfg.perceiver.fourier_bands)
      feats = jnp.concatenate([patches, jnp.broadcast_to(pos, (b,) + pos.shape)], -1)
      x = feats.astype(dt) @ self.pixel_w[...].astype(dt) + self.pixel_b[...].astype(dt)
      valid = jnp.ones(x.shape[:2], jnp.int32)
    n = self.cfg.perceiver.num_latents
    mask = AttentionMask(q_segment_ids=jnp.ones((b, n), jnp.int32), kv_segment_ids=valid)
    return x, mask

  def process(self, x, mask: AttentionMask, *, deterministic: bool = True):
    """Embedded inputs x [B, T, D] -> (latents [B, N_l, D], aux)."""
    b = x.shape[0]
    z = jnp.broadcast_to(self.latents[...].astype(x.dtype), (b,) + self.latents.shape)
    aux_total = zero_aux(self.cfg)
    for r in range(self.cfg.perceiver.num_repeats):
      z = self.cross[min(r, len(self.cross) - 1)](z, x, mask, deterministic=deterministic)
      z, _, aux = self.stacks[min(r, len(self.stacks) - 1)](z, AttentionMask(),
                                                            deterministic=deterministic)
      aux_total = {k: aux_total[k] + v for k, v in aux.items()}
    return z, aux_total

  def __call__(self, inputs, *, segment_ids=None, token_types=None,
               deterministic: bool = True) -> ModelOutput:
    """inputs: ids [B, T] or images [B, H, W, C] -> ModelOutput(logits [B, num_labels])."""
    del token_types  # single-sequence inputs: the classification task may pass none
    x, mask = self.embed(inputs, segment_ids, deterministic=deterministic)
    z, aux = self.process(x, mask, deterministic=deterministic)
    z = self.final_norm(z)
    pooled = jnp.mean(z.astype(jnp.float32), axis=1).astype(z.dtype)
    logits = self.classifier(pooled, deterministic=deterministic)
    return ModelOutput(logits=logits, aux=aux, hidden=z, pooled=pooled)
