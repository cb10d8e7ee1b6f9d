"""Hugging Face Funnel-Transformer <-> jaxformer Funnel (CATALOG D8).

FunnelModel (with the up-sampling decoder), FunnelBaseModel (without), FunnelForMaskedLM
(FunnelModel + `lm_head`, tied to the word embeddings unless stored apart) and
FunnelForSequenceClassification (FunnelBaseModel + `classifier`: linear_hidden -> tanh is our
pooler, linear_out our classifier). A checkpoint with decoder tensors (or an `lm_head`) is read as
FunnelModel, one without as FunnelBaseModel (`model.num_decoder_layers=0`); so a FunnelModel with
num_decoder_layers=0 (up-sampling and no decoder layer) reads as the base model, and with an
lm_head it is refused. Layouts: q/k/v_head [N*H, D] -> [D, N, H], post_proj [D, N*H] ->
[N, H, D]; r_kernel [D, N, H], r_w/r_r/r_s_bias [N, H] and seg_embed [2, N, H] are ours as they
are. Refused (naming the HF field): attention_type='factorized', pooling_type='max', and
block_repeats[0] > 1 with a decoder (HF's decoder then adds a state from inside the first block,
`hidden_states[block_sizes[0]]`, where jaxformer adds the first block's output). Training-only
difference: HF applies `hidden_dropout` to the sinusoid table of relative positions too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R

PREFIX = 'funnel.'


def funnel_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  R.require(c, 'attention_type', ('relative_shift',), 'the factorized form is not implemented')
  R.require(c, 'pooling_type', ('mean',), 'jaxformer pools by the mean')
  sizes = tuple(int(n) for n in c.block_sizes)
  repeats = tuple(int(n) for n in (c.block_repeats or (1,) * len(sizes)))
  decoder = any(k.startswith(f'{PREFIX}decoder.') for k in sd)
  mlm = 'lm_head.weight' in sd
  if mlm and not decoder:
    fail('hf.num_decoder_layers', c.num_decoder_layers, 'must be >= 1 for FunnelForMaskedLM: '
         'jaxformer up-samples only into decoder layers (0 is its base model)')
  if decoder and repeats[0] > 1:
    fail('hf.block_repeats', list(c.block_repeats), 'block_repeats[0] must be 1 with a decoder: '
         "HF's decoder adds hidden_states[block_sizes[0]], a state inside the first block")
  num_labels = (int(sd['classifier.linear_out.weight'].shape[0])
                if 'classifier.linear_out.weight' in sd else 0)
  over = dict(
      vocab_size=c.vocab_size, d_model=c.d_model, num_layers=sum(sizes),
      num_decoder_layers=c.num_decoder_layers if decoder else 0, norm_eps=c.layer_norm_eps,
      attention=dict(num_heads=c.n_head, head_dim=c.d_head, dropout=float(c.attention_dropout)),
      ffn=dict(activation=R.activation(c, 'hidden_act'), hidden_dim=c.d_inner,
               dropout=float(c.activation_dropout)),
      funnel=dict(block_sizes=sizes, block_repeats=None if set(repeats) == {1} else repeats,
                  separate_cls=bool(c.separate_cls), truncate_seq=bool(c.truncate_seq),
                  pool_q_only=bool(c.pool_q_only)),
      mlm_head=mlm, head_bias=mlm, num_labels=num_labels,
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd,
                               f'{PREFIX}embeddings.word_embeddings.weight', 'lm_head.weight'),
      embed_dropout=float(c.hidden_dropout), residual_dropout=float(c.hidden_dropout))
  if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size:
    over['pad_id'] = c.pad_token_id
  return 'funnel', over


def _layer(ours: str, hf: str, cfg: ModelConfig) -> list[R.Rule]:
  n, h = cfg.num_heads, cfg.head_dim
  a = f'{hf}.attention'
  return [
      R.heads_in(f'{ours}.attn.wq', f'{a}.q_head.weight', n, h),
      R.heads_in(f'{ours}.attn.wk', f'{a}.k_head.weight', n, h),
      R.heads_bias(f'{ours}.attn.bk', f'{a}.k_head.bias', n, h),
      R.heads_in(f'{ours}.attn.wv', f'{a}.v_head.weight', n, h),
      R.heads_bias(f'{ours}.attn.bv', f'{a}.v_head.bias', n, h),
      R.heads_out(f'{ours}.attn.wo', f'{a}.post_proj.weight', n, h),
      R.same(f'{ours}.attn.bo', f'{a}.post_proj.bias'),
      *[R.same(f'{ours}.attn.{p}', f'{a}.{p}')
        for p in ('r_kernel', 'r_w_bias', 'r_r_bias', 'r_s_bias', 'seg_embed')],
      *R.norm(f'{ours}.attn_sub.norm', f'{a}.layer_norm', True),
      *R.dense_ffn(f'{ours}.ffn', f'{hf}.ffn', cfg, dict(wi='linear_1', wo='linear_2')),
      *R.norm(f'{ours}.ffn_sub.norm', f'{hf}.ffn.layer_norm', True)]


def funnel_rules(cfg: ModelConfig) -> list[R.Rule]:
  p = PREFIX
  rules = [R.same('embedder.embed.embedding', f'{p}embeddings.word_embeddings.weight'),
           *R.norm('embedder.norm', f'{p}embeddings.layer_norm', True)]
  for b, size in enumerate(cfg.funnel.block_sizes):
    for i in range(size):
      rules += _layer(f'blocks.{b}.{i}', f'{p}encoder.blocks.{b}.{i}', cfg)
  for l in range(cfg.num_decoder_layers):
    rules += _layer(f'decoder.{l}', f'{p}decoder.layers.{l}', cfg)
  if cfg.mlm_head:
    rules += [R.same('head.bias', 'lm_head.bias'),
              *R.tied_head(cfg, 'embedder.embed.embedding', 'lm_head.weight', head='head')]
  if cfg.num_labels:
    rules += [R.linear('pooler.dense.w', 'classifier.linear_hidden.weight'),
              R.same('pooler.dense.b', 'classifier.linear_hidden.bias'),
              R.linear('classifier.dense.w', 'classifier.linear_out.weight'),
              R.same('classifier.dense.b', 'classifier.linear_out.bias')]
  return rules
