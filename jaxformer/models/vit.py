"""Vision Transformer (Dosovitskiy et al. 2021; CATALOG E6).

    x = [cls; patches(img) W_p + b_p] + P;  h = Encoder(x);  y = head(norm(h)_[CLS])

Images are NHWC; a patch is flattened in (row, column, channel) order, so a PyTorch conv
kernel [D, C, p, p] maps to W_p = kernel.transpose(2, 3, 1, 0).reshape(p * p * C, D).
"""

from __future__ import annotations

import einops
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import AttentionMask
from jaxformer.config import ModelConfig, fail
from jaxformer.layers.base import make_init, normal_init, param, zeros
from jaxformer.layers.norms import make_norm
from jaxformer.models.common import ModelOutput
from jaxformer.models.encoder import Classifier, Pooler
from jaxformer.models.stack import Stack


def check_config(cfg: ModelConfig) -> None:
  if cfg.image_size % cfg.patch_size:
    fail('model.patch_size', cfg.patch_size, f'must divide model.image_size={cfg.image_size}')


def embed_patches(cfg: ModelConfig, images, w, b):
  """images [B, H, W, C] -> the projected patches [B, (H / p) (W / p), D], row by row."""
  _, h, wd, c = images.shape
  if (h, wd, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
    raise ValueError(f'images of shape {(h, wd, c)} do not match model.image_size='
                     f'{cfg.image_size} and model.num_channels={cfg.num_channels} (NHWC)')
  dt = cfg.compute_dtype
  patches = einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)',
                             p=cfg.patch_size, q=cfg.patch_size).astype(dt)
  return patches @ w[...].astype(dt) + b[...].astype(dt)


class ViT(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
    self.num_patches = (cfg.image_size // p) ** 2
    # The patch projection and [CLS] are the input embedding (decay_embeddings, layer-wise LR).
    self.patch_w = param(rngs, make_init(cfg.init, cfg.init_std), (p * p * c, d),
                         (None, 'embed'), cfg.params_dtype, role='embedding')
    self.patch_b = param(rngs, zeros, (d,), ('embed',), cfg.params_dtype, role='embedding')
    self.cls = param(rngs, normal_init(cfg.init_std), (1, 1, d), (None, None, 'embed'),
                     cfg.params_dtype, role='embedding')
    self.pos = param(rngs, normal_init(cfg.init_std), (self.num_patches + 1, d),
                     ('position', 'embed'), cfg.params_dtype)
    self.dropout = nnx.Dropout(cfg.embed_dropout, rngs=rngs)
    self.stack = Stack(cfg, cfg.num_layers, causal=False, rngs=rngs)
    self.final_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.pooler else None
    self.classifier = Classifier(cfg, rngs=rngs) if cfg.num_labels else None

  def __call__(self, images, *, deterministic: bool = True) -> ModelOutput:
    """images [B, H, W, C] -> ModelOutput(logits = class logits, or hidden states without a
    classifier; pooled = pooler output)."""
    cfg = self.cfg
    b, dt = images.shape[0], cfg.compute_dtype
    x = embed_patches(cfg, images, self.patch_w, self.patch_b)
    cls = jnp.broadcast_to(self.cls[...].astype(dt), (b, 1, cfg.d_model))
    x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(dt)[None]
    x = self.dropout(x, deterministic=deterministic)
    mask = AttentionMask()
    x, _, aux = self.stack(x, mask, deterministic=deterministic)
    if self.final_norm is not None:
      x = self.final_norm(x)
    pooled = self.pooler(x) if self.pooler is not None else None
    if self.classifier is not None:
      # ViTForImageClassification classifies the normalised [CLS] state, not the pooler output.
      logits = self.classifier(x[:, 0], deterministic=deterministic)
    else:
      logits = x
    return ModelOutput(logits=logits, aux=aux, hidden=x, pooled=pooled)
