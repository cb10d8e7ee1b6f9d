"""Hugging Face Swin (SwinModel, SwinForImageClassification) <-> jaxformer Swin (CATALOG D9, E6).

The patch Conv2d kernel [C, c, p, p] becomes our [p * p * c, C] patch matrix as in ViT; each
block's q/k/v/o projections, its relative position bias table [(2w - 1)^2, N] (the same layout:
HF indexes it with the same (dy + w - 1)(2w - 1) + dx + w - 1), two LayerNorms and MLP map one to
one; patch merging is `downsample.norm` over 4C and `downsample.reduction` [2C, 4C] without bias,
whose input order (x0, x1, x2, x3) is ours. SwinModel's pooler is an average pool (no weights).
Checkpoints in the v4 layout (`attention.self.query`, `attention.self.relative_position_bias_
table`, `intermediate.dense`, ...) are renamed on import, as transformers 5 does.

HF clips the window to a stage's map only where the map equals the window (a smaller map would
not fit its bias table); configs with a smaller map than the window are refused by HF itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R
from jaxformer.interop.hf_encoders import _square
from jaxformer.models.swin import stage_config


def swin_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  R.require(c, 'use_absolute_embeddings', (False,), 'Swin here has relative positions only')
  R.require(c, 'layer_norm_eps', (1e-5,), "HF's patch-embedding and patch-merging LayerNorms "
            "keep PyTorch's 1e-5 whatever layer_norm_eps says, and jaxformer has one "
            'model.norm_eps')
  if 'swin.embeddings.mask_token' in sd:
    fail('hf.use_mask_token', True, 'masked image modeling (SwinForMaskedImageModeling) is not '
         'supported')
  num_labels = int(sd['classifier.weight'].shape[0]) if 'classifier.weight' in sd else 0
  depths, heads = tuple(int(x) for x in c.depths), tuple(int(x) for x in c.num_heads)
  return 'swin', dict(
      d_model=c.embed_dim, num_layers=sum(depths), norm_eps=c.layer_norm_eps,
      attention=dict(num_heads=heads[0], qkv_bias=bool(c.qkv_bias), out_bias=True,
                     dropout=float(c.attention_probs_dropout_prob)),
      ffn=dict(activation=R.activation(c, 'hidden_act')),
      swin=dict(depths=depths, num_heads=heads, window_size=int(c.window_size),
                mlp_ratio=float(c.mlp_ratio)),
      image_size=_square(c, 'image_size'), patch_size=_square(c, 'patch_size'),
      num_channels=c.num_channels, num_labels=num_labels,
      embed_dropout=float(c.hidden_dropout_prob), residual_dropout=float(c.hidden_dropout_prob),
      drop_path=float(c.drop_path_rate))


def swin_rules(cfg: ModelConfig) -> list[R.Rule]:
  p, ch, d = cfg.patch_size, cfg.num_channels, cfg.d_model
  e = 'swin.embeddings'
  rules = [R.Rule(('patch_w',), (f'{e}.patch_embeddings.projection.weight',),
                  lambda w: (w.transpose(2, 3, 1, 0).reshape(p * p * ch, d),),
                  lambda w: (w.reshape(p, p, ch, d).transpose(3, 2, 0, 1),)),
           R.same('patch_b', f'{e}.patch_embeddings.projection.bias'),
           *R.norm('patch_norm', f'{e}.norm', True),
           *R.norm('final_norm', 'swin.layernorm', True)]
  names = dict(q='q_proj', k='k_proj', v='v_proj', o='o_proj')
  depths = cfg.swin.depths
  for s, depth in enumerate(depths):
    scfg = stage_config(cfg, s)
    for i in range(depth):
      blk, hf = f'stages.{s}.blocks.{i}', f'swin.encoder.layers.{s}.blocks.{i}'
      rules += [*R.attention(f'{blk}.attn', f'{hf}.attention', scfg, names),
                R.same(f'{blk}.relative_bias', f'{hf}.attention.relative_position_bias.'
                       'relative_position_bias_table'),
                *R.norm(f'{blk}.attn_sub.norm', f'{hf}.layernorm_before', True),
                *R.norm(f'{blk}.ffn_sub.norm', f'{hf}.layernorm_after', True),
                *R.dense_ffn(f'{blk}.ffn', f'{hf}.mlp', scfg, dict(wi='fc1', wo='fc2'))]
    if s < len(depths) - 1:
      down = f'swin.encoder.layers.{s}.downsample'
      rules += [*R.norm(f'stages.{s}.merge.norm', f'{down}.norm', True),
                R.linear(f'stages.{s}.merge.reduction', f'{down}.reduction.weight')]
  if cfg.num_labels:
    rules += [R.linear('classifier.dense.w', 'classifier.weight'),
              R.same('classifier.dense.b', 'classifier.bias')]
  return rules


# transformers 5's own renaming of v4 Swin checkpoints (conversion_mapping.py, 'swin').
_SWIN_V4 = ((r'\.attention\.self\.query\.', '.attention.q_proj.'),
            (r'\.attention\.self\.key\.', '.attention.k_proj.'),
            (r'\.attention\.self\.value\.', '.attention.v_proj.'),
            (r'\.attention\.self\.relative_position_bias_table$',
             '.attention.relative_position_bias.relative_position_bias_table'),
            (r'\.attention\.output\.dense\.', '.attention.o_proj.'),
            (r'\.intermediate\.dense\.', '.mlp.fc1.'),
            (r'\.output\.dense\.', '.mlp.fc2.'))


# Buffers of v4 checkpoints that transformers 5 recomputes from the window size.
SWIN_IGNORE = (r'\.relative_position_index$',)


def swin_normalize(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames v4-layout Swin keys (`...blocks.{i}.attention.self.query`) to v5."""
  return R.rename_keys(sd, '.blocks.', _SWIN_V4)
