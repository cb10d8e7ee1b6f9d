"""Hugging Face encoder-decoders <-> jaxformer EncoderDecoder (CATALOG E5).

T5 (T5ForConditionalGeneration, v1.0 and v1.1): RMSNorm without mean or bias, no 1/sqrt(d)
score scaling, head dim d_kv independent of d_model / num_heads, one relative-bias table per
stack stored in block 0 and shared by all its layers (bidirectional buckets in the encoder,
causal in the decoder), ReLU FFN (v1.0) or gated GELU wi_0 / wi_1 (v1.1). transformers 5 always
ties `lm_head` to `shared` in the module; `scale_decoder_outputs` (False for v1.1 configs, which
say tie_word_embeddings=False) decides the d_model**-0.5 output scaling. A checkpoint whose
lm_head differs from `shared` (original v1.1) gets an untied head, as `from_pretrained` does.

BART (BartForConditionalGeneration): post-LN, learned positions with offset 2 and a separate
table and embedding LayerNorm per stack, optional sqrt(d) embedding scale, tied head plus the
`final_logits_bias` buffer. LayerNorm eps is PyTorch's 1e-5. LayerDrop is not reproduced
(training only).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R


# --------------------------------------------------------------------------- T5
def t5_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  scale = getattr(c, 'scale_decoder_outputs', getattr(c, 'tie_word_embeddings', True))
  gated = bool(c.is_gated_act)
  dense_act = c.dense_act_fn
  if dense_act not in R.ACTIVATIONS:
    fail('hf.feed_forward_proj', c.feed_forward_proj,
         f'supported activations are {sorted(R.ACTIVATIONS)} (optionally gated-)')
  R.shared_tables(sd, ('shared.weight', 'encoder.embed_tokens.weight',
                      'decoder.embed_tokens.weight'),
                  'tie_word_embeddings', getattr(c, 'tie_word_embeddings', True))
  rate = float(c.dropout_rate)
  over = dict(
      vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers,
      num_decoder_layers=c.num_decoder_layers, norm_eps=c.layer_norm_epsilon,
      attention=dict(num_heads=c.num_heads, head_dim=c.d_kv, dropout=rate),
      position=dict(kind='t5', num_buckets=c.relative_attention_num_buckets,
                    max_distance=c.relative_attention_max_distance),
      ffn=dict(activation=R.ACTIVATIONS[dense_act], gated=gated, hidden_dim=c.d_ff, bias=False,
               dropout=rate),
      tie_embeddings=R.is_tied(True, sd, 'shared.weight', 'lm_head.weight'),
      logits_scale=c.d_model ** -0.5 if scale else None,
      embed_dropout=rate, residual_dropout=rate)
  if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size:
    over['pad_id'] = c.pad_token_id
  return ('t5_v1_1' if gated else 't5'), over


def t5_rules(cfg: ModelConfig) -> list[R.Rule]:
  ffn = (dict(wi_gate='wi_0', wi_up='wi_1', wo='wo') if cfg.ffn.gated else
         dict(wi='wi', wo='wo'))
  names = dict(q='q', k='k', v='v', o='o')
  rules = [R.same('shared.embedding', 'shared.weight'),
           R.alias('shared.embedding', 'encoder.embed_tokens.weight'),
           R.alias('shared.embedding', 'decoder.embed_tokens.weight'),
           *R.tied_head(cfg, 'shared.embedding', 'lm_head.weight')]
  for side, n in (('encoder', cfg.num_layers), ('decoder', cfg.decoder_layers)):
    rules += [R.same(f'{side}.position_bias.embedding',
                     f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
              *R.norm(f'{side[:3]}_norm', f'{side}.final_layer_norm', False)]
    for l in range(n):
      blk, hf = f'{side}.layers.blocks.0', f'{side}.block.{l}.layer'
      rules += [*R.attention(f'{blk}.self_attn', f'{hf}.0.SelfAttention', cfg, names, l),
                *R.norm(f'{blk}.attn_sub.norm', f'{hf}.0.layer_norm', False, l)]
      f = 1
      if side == 'decoder':
        rules += [*R.attention(f'{blk}.cross_attn', f'{hf}.1.EncDecAttention', cfg, names, l),
                  *R.norm(f'{blk}.cross_sub.norm', f'{hf}.1.layer_norm', False, l)]
        f = 2
      rules += [*R.dense_ffn(f'{blk}.ffn', f'{hf}.{f}.DenseReluDense', cfg, ffn, l),
                *R.norm(f'{blk}.ffn_sub.norm', f'{hf}.{f}.layer_norm', False, l)]
  return rules


T5_IGNORE = (r'^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$',)


# --------------------------------------------------------------------------- BART
def bart_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  if c.decoder_attention_heads != c.encoder_attention_heads:
    fail('hf.decoder_attention_heads', c.decoder_attention_heads,
         f'must equal encoder_attention_heads={c.encoder_attention_heads}')
  if c.decoder_ffn_dim != c.encoder_ffn_dim:
    fail('hf.decoder_ffn_dim', c.decoder_ffn_dim,
         f'must equal encoder_ffn_dim={c.encoder_ffn_dim}')
  R.shared_tables(sd, ('model.shared.weight', 'model.encoder.embed_tokens.weight',
                      'model.decoder.embed_tokens.weight'),
                  'tie_word_embeddings', c.tie_word_embeddings)
  over = dict(
      vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.encoder_layers,
      num_decoder_layers=c.decoder_layers, max_length=c.max_position_embeddings, norm_eps=1e-5,
      attention=dict(num_heads=c.encoder_attention_heads, dropout=float(c.attention_dropout)),
      position=dict(kind='learned', offset=2, max_length=c.max_position_embeddings),
      ffn=dict(activation=R.activation(c, 'activation_function'), hidden_dim=c.encoder_ffn_dim,
               dropout=float(c.activation_dropout)),
      embed_scale=bool(c.scale_embedding),
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd, 'model.shared.weight',
                               'lm_head.weight'),
      embed_dropout=float(c.dropout), residual_dropout=float(c.dropout))
  if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size:
    over['pad_id'] = c.pad_token_id
  return 'bart', over


def bart_rules(cfg: ModelConfig) -> list[R.Rule]:
  v = cfg.vocab_size
  names = dict(q='q_proj', k='k_proj', v='v_proj', o='out_proj')
  rules = [R.same('shared.embedding', 'model.shared.weight'),
           R.alias('shared.embedding', 'model.encoder.embed_tokens.weight'),
           R.alias('shared.embedding', 'model.decoder.embed_tokens.weight'),
           *R.tied_head(cfg, 'shared.embedding', 'lm_head.weight'),
           R.Rule(('head.bias',), ('final_logits_bias',), lambda b: (b.reshape(v),),
                  lambda b: (b.reshape(1, v),), default=lambda: (np.zeros((1, v), np.float32),))]
  for side, n in (('encoder', cfg.num_layers), ('decoder', cfg.decoder_layers)):
    ours, hf = side[:3] + '_embedder', f'model.{side}'
    rules += [R.same(f'{ours}.positions.table', f'{hf}.embed_positions.weight'),
              *R.norm(f'{ours}.norm', f'{hf}.layernorm_embedding', True)]
    for l in range(n):
      blk, lay = f'{side}.layers.blocks.0', f'{hf}.layers.{l}'
      rules += [*R.attention(f'{blk}.self_attn', f'{lay}.self_attn', cfg, names, l),
                *R.norm(f'{blk}.attn_sub.norm', f'{lay}.self_attn_layer_norm', True, l)]
      if side == 'decoder':
        rules += [*R.attention(f'{blk}.cross_attn', f'{lay}.encoder_attn', cfg, names, l),
                  *R.norm(f'{blk}.cross_sub.norm', f'{lay}.encoder_attn_layer_norm', True, l)]
      rules += [*R.dense_ffn(f'{blk}.ffn', lay, cfg, dict(wi='fc1', wo='fc2'), l),
                *R.norm(f'{blk}.ffn_sub.norm', f'{lay}.final_layer_norm', True, l)]
  return rules
