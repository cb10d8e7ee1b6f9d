"""Hugging Face Mamba (MambaForCausalLM) <-> the jaxformer 'mamba' family (CATALOG D10).

HF `MambaBlock` is h = x + mixer(RMSNorm(x)) with no FFN: the 'mamba' preset with
`mamba.attention_every=0` and `mamba.ffn=False`. Layouts (PyTorch Linear is [out, in]):
    in_proj.weight  [2I, D]     ->  mixer.w_in  [D, 2, I]  (rows: x, then z)
    in_proj.bias    [2I]        ->  mixer.b_in  [2, I]
    conv1d.weight   [I, 1, W]   ->  mixer.conv_w [W, I]
    x_proj.weight   [R+2N, I]   ->  mixer.w_x  [I, R+2N]
    dt_proj.weight  [I, R]      ->  mixer.w_dt [R, I]
    out_proj.weight [D, I]      ->  mixer.w_out [I, D]
and conv1d.bias, dt_proj.bias, A_log, D, out_proj.bias as they are. HF keeps the residual
stream in float32 (`residual_in_fp32`); jaxformer keeps it in `model.dtype`, which is the same
for the float32 models that the converter builds by default.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R


def mamba_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  R.require(c, 'hidden_act', ('silu',), 'the convolution activation of the Mamba mixer')
  if int(c.expand * c.hidden_size) != c.intermediate_size:
    fail('hf.intermediate_size', c.intermediate_size,
         f'must be expand * hidden_size = {c.expand} * {c.hidden_size}')
  return 'mamba', dict(
      vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
      norm_eps=c.layer_norm_epsilon,
      mamba=dict(d_state=c.state_size, d_conv=c.conv_kernel, expand=int(c.expand),
                 dt_rank=int(c.time_step_rank), dt_min=float(c.time_step_min),
                 dt_max=float(c.time_step_max), dt_init=c.time_step_init_scheme,
                 dt_scale=float(c.time_step_scale), dt_floor=float(c.time_step_floor),
                 conv_bias=bool(c.use_conv_bias), use_bias=bool(c.use_bias),
                 attention_every=0, ffn=False),
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd, 'backbone.embeddings.weight',
                               'lm_head.weight'))


def mamba_rules(cfg: ModelConfig) -> list[R.Rule]:
  d, i = cfg.d_model, cfg.mamba_inner_dim
  m = cfg.mamba
  rules = [R.same('embedder.embed.embedding', 'backbone.embeddings.weight'),
           *R.norm('final_norm', 'backbone.norm_f', False),
           *R.tied_head(cfg, 'embedder.embed.embedding', 'lm_head.weight')]
  for l in range(cfg.num_layers):
    blk, hf = 'stack.layers.blocks.0', f'backbone.layers.{l}'
    mx, hm = f'{blk}.mixer', f'{hf}.mixer'
    rules += [
        *R.norm(f'{blk}.mixer_sub.norm', f'{hf}.norm', False, l),
        R.Rule((f'{mx}.w_in',), (f'{hm}.in_proj.weight',),
               lambda w: (w.reshape(2, i, d).transpose(2, 0, 1),),
               lambda w: (w.transpose(1, 2, 0).reshape(2 * i, d),), l),
        R.Rule((f'{mx}.conv_w',), (f'{hm}.conv1d.weight',), lambda w: (w[:, 0, :].T,),
               lambda w: (w.T[:, None, :],), l),
        R.linear(f'{mx}.w_x', f'{hm}.x_proj.weight', l),
        R.linear(f'{mx}.w_dt', f'{hm}.dt_proj.weight', l),
        R.same(f'{mx}.b_dt', f'{hm}.dt_proj.bias', l),
        R.same(f'{mx}.a_log', f'{hm}.A_log', l),
        R.same(f'{mx}.d', f'{hm}.D', l),
        R.linear(f'{mx}.w_out', f'{hm}.out_proj.weight', l),
    ]
    if m.conv_bias:
      rules.append(R.same(f'{mx}.conv_b', f'{hm}.conv1d.bias', l))
    if m.use_bias:
      rules += [R.Rule((f'{mx}.b_in',), (f'{hm}.in_proj.bias',), lambda b: (b.reshape(2, i),),
                       lambda b: (b.reshape(2 * i),), l),
                R.same(f'{mx}.b_out', f'{hm}.out_proj.bias', l)]
  return rules


def mamba_hf_config(cfg: ModelConfig):
  """The transformers MambaConfig of a pure Mamba model (raises ConfigError naming the first
  field HF cannot express)."""
  import transformers

  t, m = 'Mamba', cfg.mamba
  R.need(cfg, 'family', cfg.family, 'mamba', t)
  R.need(cfg, 'mamba.attention_every', m.attention_every, 0, t)
  R.need(cfg, 'mamba.ffn', m.ffn, False, t)
  R.need(cfg, 'norm', cfg.norm, 'rmsnorm', t)
  R.need(cfg, 'norm_position', cfg.norm_position, 'pre', t)
  R.need(cfg, 'final_norm', cfg.final_norm, True, t)
  R.need(cfg, 'position.kind', cfg.position.kind, 'none', t)
  for field in ('embed_norm', 'embed_scale', 'head_bias'):
    R.need(cfg, field, getattr(cfg, field), False, t)
  R.need(cfg, 'logits_scale', cfg.logits_scale, None, t)
  R.need(cfg, 'final_logit_softcap', cfg.final_logit_softcap, None, t)
  R.need(cfg, 'type_vocab_size', cfg.type_vocab_size, 0, t)
  return transformers.MambaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      state_size=m.d_state, conv_kernel=m.d_conv, expand=m.expand,
      time_step_rank=cfg.mamba_dt_rank, time_step_min=m.dt_min, time_step_max=m.dt_max,
      time_step_init_scheme=m.dt_init, time_step_scale=m.dt_scale, time_step_floor=m.dt_floor,
      use_conv_bias=m.conv_bias, use_bias=m.use_bias, layer_norm_epsilon=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, residual_in_fp32=cfg.dtype == 'float32',
      bos_token_id=None, eos_token_id=None, pad_token_id=None,
      architectures=['MambaForCausalLM'])
