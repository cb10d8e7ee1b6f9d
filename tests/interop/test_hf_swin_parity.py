"""Hugging Face Swin parity (CATALOG D9, E6): tiny randomly initialised transformers Swin models
(built locally), converted with `from_hf`, give the same fp32 outputs within 1e-4 max abs.
Every HF parameter is perturbed after init so norm scales, biases and the relative position
bias tables are not the trivial ones/zeros."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.interop.hf import from_hf

ATOL = 1e-4
# Module names of transformers 4 Swin checkpoints.
V5_TO_V4 = (('attention.q_proj', 'attention.self.query'),
            ('attention.k_proj', 'attention.self.key'),
            ('attention.v_proj', 'attention.self.value'),
            ('attention.relative_position_bias.relative_position_bias_table',
             'attention.self.relative_position_bias_table'),
            ('attention.o_proj', 'attention.output.dense'),
            ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense'))


def hf_model(model_cls, seed=0, **kw):
  torch.manual_seed(seed)
  model = model_cls(T.SwinConfig(attn_implementation='eager', **kw))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def max_err(ours, ref):
  ours, ref = np.asarray(ours, np.float32), ref.numpy()
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)))


def nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def test_swin_classification_parity_and_v4_checkpoint_names():
  # 8 x 8 then 4 x 4 patch maps with 2 x 2 windows: both stages have a shifted block.
  hf = hf_model(T.SwinForImageClassification, image_size=16, patch_size=2, embed_dim=16,
                depths=[2, 2], num_heads=[2, 4], window_size=2, num_labels=5)
  cfg, model = from_hf(hf)
  assert cfg.swin.depths == (2, 2) and cfg.swin.num_heads == (2, 4) and cfg.num_labels == 5
  images = torch.randn(2, 3, 16, 16)
  with torch.no_grad():
    ref = hf(images).logits
  assert max_err(nnx.jit(lambda m, x: m(x).logits)(model, nhwc(images)), ref) <= ATOL
  # The same weights under transformers 4 names (and its stored index buffer) load the same.
  v4 = {}
  for k, v in hf.state_dict().items():
    for new, old in V5_TO_V4:
      k = k.replace(new, old)
    v4[k] = v
  v4['swin.encoder.layers.0.blocks.0.attention.self.relative_position_index'] = torch.zeros(16)
  assert any('attention.self.query' in k for k in v4)
  _, again = from_hf(hf.config, v4)
  for a, b in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                  nnx.to_flat_state(nnx.state(again, nnx.Param))):
    assert a[0] == b[0] and np.array_equal(a[1][...], b[1][...]), a[0]


@pytest.mark.slow
def test_swin_model_parity_three_stages_odd_depth_clipped_window():
  # 16 / 8 / 4 maps with 4 x 4 windows: the last map is one window (HF and the paper then do
  # not shift); depths 1-2-3, another MLP ratio and activation, one input channel.
  hf = hf_model(T.SwinModel, image_size=32, patch_size=2, num_channels=1, embed_dim=8,
                depths=[1, 2, 3], num_heads=[1, 2, 4], window_size=4, mlp_ratio=2.0,
                hidden_act='gelu_new')
  cfg, model = from_hf(hf)
  assert cfg.num_labels == 0 and cfg.ffn.activation == 'gelu_tanh'
  images = torch.randn(2, 1, 32, 32)
  with torch.no_grad():
    ref = hf(images)
  out = model(nhwc(images))
  assert max_err(out.logits, ref.last_hidden_state) <= ATOL
  assert max_err(out.pooled, ref.pooler_output) <= ATOL


def test_unsupported_hf_settings_are_refused_naming_the_field():
  hf = hf_model(T.SwinModel, image_size=8, patch_size=2, embed_dim=8, depths=[2],
                num_heads=[2], window_size=2, layer_norm_eps=1e-6)
  with pytest.raises(ConfigError, match='hf.layer_norm_eps.*1e-05'):
    from_hf(hf)
  hf = hf_model(T.SwinModel, image_size=8, patch_size=2, embed_dim=8, depths=[2],
                num_heads=[2], window_size=2, use_absolute_embeddings=True)
  with pytest.raises(ConfigError, match='hf.use_absolute_embeddings'):
    from_hf(hf)
