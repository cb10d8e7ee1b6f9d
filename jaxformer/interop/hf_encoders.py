"""Hugging Face encoders <-> jaxformer EncoderModel / ViT (CATALOG E2, E6).

BERT (BertForMaskedLM, BertModel, BertForSequenceClassification: a Linear classifier on the
pooler output, our `model.num_labels`) and RoBERTa (RobertaForMaskedLM, RobertaModel): post-LN
layers, an embedding LayerNorm over word + position + token-type embeddings, an MLM head
LN(act(h W + b)) E^T + b tied to the word embeddings, an optional tanh pooler. RoBERTa's
position ids start at padding_idx + 1, so its table of max_position_embeddings rows is our
`offset = pad_token_id + 1` table over max_position_embeddings - offset positions; its MLM head
always uses exact GELU. BERT positions are arange over the whole (padded) row while jaxformer
restarts positions after padding, so left-padded BERT inputs need explicit `positions=`.

ELECTRA (ElectraForPreTraining: the discriminator, ElectraForMaskedLM: the generator,
ElectraModel) is BERT's encoder with embeddings of width `embedding_size` (our
`model.embed_dim`) and, when that differs from hidden_size, `embeddings_project` (our
`embed_proj`); the generator head is LN(gelu(h W + b)) E^T + b of width embedding_size (exact
GELU whatever hidden_act), the discriminator head act(h W + b) w + c with hidden_act (our
`rtd_head`). Each imports as an `encoder`-family model, the module the `electra` family runs
as its two halves; `jaxformer.interop.hf.electra_from_hf` imports a generator and a
discriminator with equal embeddings as one `electra` model.

ViT (ViTModel, ViTForImageClassification): the patch Conv2d kernel [D, C, p, p] becomes our
[p * p * C, D] patch matrix (our images are NHWC, patches flattened row, column, channel);
pre-LN layers, final LayerNorm, tanh pooler on [CLS] (ViTModel) or a classifier on the final
normalised [CLS] state (ViTForImageClassification). Checkpoints in the v4 layout
(`encoder.layer.{l}.attention.attention.query`, ...) are renamed on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R


# --------------------------------------------------------------------------- BERT / RoBERTa
# name -> (transform dense, its LayerNorm, decoder, the vocabulary bias and its duplicates)
_MLM_HEADS = {
    'bert': ('cls.predictions.transform.dense', 'cls.predictions.transform.LayerNorm',
             'cls.predictions.decoder', ('cls.predictions.bias', 'cls.predictions.decoder.bias')),
    'roberta': ('lm_head.dense', 'lm_head.layer_norm', 'lm_head.decoder',
                ('lm_head.bias', 'lm_head.decoder.bias')),
    'electra': ('generator_predictions.dense', 'generator_predictions.LayerNorm',
                'generator_lm_head', ('generator_lm_head.bias',)),
}
_RTD_HEAD = 'discriminator_predictions'
_CLASSIFIER = 'classifier.weight'  # BertForSequenceClassification: Linear on the pooler output


def bert_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  name = c.model_type
  prefix = f'{name}.'
  R.require(c, 'is_decoder', (False,), f'causal {name} decoders')
  R.require(c, 'add_cross_attention', (False,), 'cross-attention')
  R.require(c, 'position_embedding_type', ('absolute',), 'relative position embeddings')
  transform, _, decoder, (bias, *_) = _MLM_HEADS[name]
  mlm = bias in sd
  act = R.activation(c, 'hidden_act')
  if name in ('roberta', 'electra') and mlm and act != 'gelu':
    fail('hf.hidden_act', c.hidden_act, f"{transform} always applies exact GELU and jaxformer's "
         "MLM head uses the FFN activation, so only 'gelu' is supported")
  offset = c.pad_token_id + 1 if name == 'roberta' else 0
  positions = c.max_position_embeddings - offset
  head = f'{decoder}.weight'
  over = dict(
      vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
      max_length=positions, norm_eps=c.layer_norm_eps,
      attention=dict(num_heads=c.num_attention_heads,
                     dropout=float(c.attention_probs_dropout_prob)),
      position=dict(kind='learned', max_length=positions, offset=offset),
      ffn=dict(activation=act, hidden_dim=c.intermediate_size),
      type_vocab_size=c.type_vocab_size, mlm_head=mlm, pooler=f'{prefix}pooler.dense.weight' in sd,
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd,
                               f'{prefix}embeddings.word_embeddings.weight', head),
      embed_dropout=float(c.hidden_dropout_prob), residual_dropout=float(c.hidden_dropout_prob))
  if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size:
    over['pad_id'] = c.pad_token_id
  if name == 'bert' and _CLASSIFIER in sd:  # BertForSequenceClassification
    over['num_labels'] = int(sd[_CLASSIFIER].shape[0])
  if name == 'electra':
    over.update(embed_dim=c.embedding_size, rtd_head=f'{_RTD_HEAD}.dense.weight' in sd)
    name = 'bert'  # the same encoder; the electra preset is the generator + discriminator pair
  return name, over


def bert_rules(cfg: ModelConfig, name: str) -> list[R.Rule]:
  p = f'{name}.'
  rules = [R.same('embedder.embed.embedding', f'{p}embeddings.word_embeddings.weight'),
           R.same('embedder.positions.table', f'{p}embeddings.position_embeddings.weight'),
           R.same('embedder.token_types.embedding', f'{p}embeddings.token_type_embeddings.weight'),
           *R.norm('embedder.norm', f'{p}embeddings.LayerNorm', True)]
  names = dict(q='attention.self.query', k='attention.self.key', v='attention.self.value',
               o='attention.output.dense')
  for l in range(cfg.num_layers):
    blk, hf = 'stack.layers.blocks.0', f'{p}encoder.layer.{l}'
    rules += [*R.attention(f'{blk}.self_attn', hf, cfg, names, l),
              *R.norm(f'{blk}.attn_sub.norm', f'{hf}.attention.output.LayerNorm', True, l),
              *R.dense_ffn(f'{blk}.ffn', hf, cfg, dict(wi='intermediate.dense',
                                                         wo='output.dense'), l),
              *R.norm(f'{blk}.ffn_sub.norm', f'{hf}.output.LayerNorm', True, l)]
  if cfg.embed_width != cfg.d_model:
    rules += [R.linear('embed_proj.w', f'{p}embeddings_project.weight'),
              R.same('embed_proj.b', f'{p}embeddings_project.bias')]
  if cfg.pooler:
    rules += [R.linear('pooler.dense.w', f'{p}pooler.dense.weight'),
              R.same('pooler.dense.b', f'{p}pooler.dense.bias')]
  if cfg.mlm_head:
    dense, ln, decoder, (bias, *copies) = _MLM_HEADS[name]
    rules += [R.linear('mlm.transform.w', f'{dense}.weight'),
              R.same('mlm.transform.b', f'{dense}.bias'),
              *R.norm('mlm.norm', ln, True),
              R.same('mlm.decoder.bias', bias),
              *[R.alias('mlm.decoder.bias', k) for k in copies],
              *R.tied_head(cfg, 'embedder.embed.embedding', f'{decoder}.weight',
                           head='mlm.decoder')]
  if cfg.num_labels and name == 'bert':
    rules += [R.linear('classifier.dense.w', _CLASSIFIER),
              R.same('classifier.dense.b', 'classifier.bias')]
  if cfg.rtd_head:
    rules += [R.linear('rtd.dense.w', f'{_RTD_HEAD}.dense.weight'),
              R.same('rtd.dense.b', f'{_RTD_HEAD}.dense.bias'),
              R.linear('rtd.prediction.w', f'{_RTD_HEAD}.dense_prediction.weight'),
              R.same('rtd.prediction.b', f'{_RTD_HEAD}.dense_prediction.bias')]
  return rules


# --------------------------------------------------------------------------- ELECTRA pairs
# Config fields the jaxformer generator takes from the discriminator (models/electra.py), and
# the embedding tensors the two share.
_ELECTRA_SHARED = ('vocab_size', 'embedding_size', 'max_position_embeddings', 'type_vocab_size',
                   'layer_norm_eps', 'hidden_act', 'hidden_dropout_prob',
                   'attention_probs_dropout_prob', 'pad_token_id')
_ELECTRA_EMBEDDINGS = ('word_embeddings.weight', 'position_embeddings.weight',
                       'token_type_embeddings.weight', 'LayerNorm.weight', 'LayerNorm.bias')


def electra_pair_config(gen, gen_sd: Mapping[str, np.ndarray], disc,
                        disc_sd: Mapping[str, np.ndarray]) -> dict:
  """`electra`-family overrides from a generator (ElectraForMaskedLM) and a discriminator
  (ElectraForPreTraining) whose embeddings are one set, as ELECTRA trains them."""
  for field in _ELECTRA_SHARED:
    g, d = getattr(gen, field, None), getattr(disc, field, None)
    if g != d:
      fail(f'hf.{field}', g, f"the generator's must equal the discriminator's ({d!r}): "
           "jaxformer's ELECTRA derives the generator from the discriminator's config")
  _, g = bert_config(gen, gen_sd)
  _, d = bert_config(disc, disc_sd)
  if not g['mlm_head']:
    fail('hf.generator', type(gen).__name__, 'must be an ElectraForMaskedLM checkpoint (it has '
         f'no {_MLM_HEADS["electra"][3][0]})')
  if not d['rtd_head']:
    fail('hf.discriminator', type(disc).__name__, 'must be an ElectraForPreTraining checkpoint '
         f'(it has no {_RTD_HEAD}.dense.weight)')
  for key in (f'electra.embeddings.{k}' for k in _ELECTRA_EMBEDDINGS):
    if not np.array_equal(gen_sd[key], disc_sd[key]):
      fail('hf.generator', key, "differs from the discriminator's, but jaxformer's ELECTRA "
           'shares one embedder between the two (as ELECTRA pre-training does)')
  over = {k: v for k, v in d.items() if k not in ('mlm_head', 'rtd_head')}
  over.update(tie_embeddings=g['tie_embeddings'], electra=dict(
      generator_d_model=gen.hidden_size, generator_num_layers=gen.num_hidden_layers,
      generator_num_heads=gen.num_attention_heads, generator_ffn_dim=gen.intermediate_size))
  return over


def electra_pair_rules(cfg: ModelConfig) -> list[R.Rule]:
  """The encoder rules of each half, our paths under `generator.` / `discriminator.` and the
  HF keys under `generator/` / `discriminator/` (the two checkpoints' keys coincide)."""
  from jaxformer.models import electra  # pylint: disable=import-outside-toplevel
  rules = []
  for half, c in (('generator', electra.generator_config(cfg)),
                  ('discriminator', electra.discriminator_config(cfg))):
    rules += [dataclasses.replace(r, ours=tuple(f'{half}.{o}' for o in r.ours),
                                  hf=tuple(f'{half}/{k}' for k in r.hf))
              for r in bert_rules(c, 'electra')]
  return rules


# --------------------------------------------------------------------------- ViT
def _square(c, field: str) -> int:
  v = getattr(c, field)
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      fail(f'hf.{field}', v, 'only square sizes are supported')
    v = v[0]
  return int(v)


def vit_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  pooler = 'vit.pooler.dense.weight' in sd
  if pooler:
    R.require(c, 'pooler_act', ('tanh',), 'the jaxformer pooler is tanh(h_cls W + b)')
    if c.pooler_output_size not in (None, c.hidden_size):
      fail('hf.pooler_output_size', c.pooler_output_size,
           f'must equal hidden_size={c.hidden_size}')
  num_labels = int(sd['classifier.weight'].shape[0]) if 'classifier.weight' in sd else 0
  return 'vit', dict(
      d_model=c.hidden_size, num_layers=c.num_hidden_layers, norm_eps=c.layer_norm_eps,
      attention=dict(num_heads=c.num_attention_heads, qkv_bias=bool(c.qkv_bias), out_bias=True,
                     dropout=float(c.attention_probs_dropout_prob)),
      ffn=dict(activation=R.activation(c, 'hidden_act'), hidden_dim=c.intermediate_size),
      image_size=_square(c, 'image_size'), patch_size=_square(c, 'patch_size'),
      num_channels=c.num_channels, pooler=pooler, num_labels=num_labels,
      embed_dropout=float(c.hidden_dropout_prob), residual_dropout=float(c.hidden_dropout_prob))


def vit_rules(cfg: ModelConfig) -> list[R.Rule]:
  p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
  e = 'vit.embeddings'
  rules = [R.same('cls', f'{e}.cls_token'),
           R.Rule(('pos',), (f'{e}.position_embeddings',), lambda x: (x[0],),
                  lambda x: (x[None],)),
           R.Rule(('patch_w',), (f'{e}.patch_embeddings.projection.weight',),
                  lambda w: (w.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
                  lambda w: (w.reshape(p, p, c, d).transpose(3, 2, 0, 1),)),
           R.same('patch_b', f'{e}.patch_embeddings.projection.bias'),
           *R.norm('final_norm', 'vit.layernorm', True)]
  names = dict(q='q_proj', k='k_proj', v='v_proj', o='o_proj')
  for l in range(cfg.num_layers):
    blk, hf = 'stack.layers.blocks.0', f'vit.layers.{l}'
    rules += [*R.attention(f'{blk}.self_attn', f'{hf}.attention', cfg, names, l),
              *R.norm(f'{blk}.attn_sub.norm', f'{hf}.layernorm_before', True, l),
              *R.norm(f'{blk}.ffn_sub.norm', f'{hf}.layernorm_after', True, l),
              *R.dense_ffn(f'{blk}.ffn', f'{hf}.mlp', cfg, dict(wi='fc1', wo='fc2'), l)]
  if cfg.pooler:
    rules += [R.linear('pooler.dense.w', 'vit.pooler.dense.weight'),
              R.same('pooler.dense.b', 'vit.pooler.dense.bias')]
  if cfg.num_labels:
    rules += [R.linear('classifier.dense.w', 'classifier.weight'),
              R.same('classifier.dense.b', 'classifier.bias')]
  return rules


_VIT_V4 = ((r'\.encoder\.layer\.(\d+)\.', r'.layers.\1.'),
           (r'\.attention\.attention\.query\.', '.attention.q_proj.'),
           (r'\.attention\.attention\.key\.', '.attention.k_proj.'),
           (r'\.attention\.attention\.value\.', '.attention.v_proj.'),
           (r'\.attention\.output\.dense\.', '.attention.o_proj.'),
           (r'\.intermediate\.dense\.', '.mlp.fc1.'),
           (r'\.output\.dense\.', '.mlp.fc2.'))


def vit_normalize(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames v4-layout ViT keys (`vit.encoder.layer.{l}.attention.attention.query`) to v5."""
  return R.rename_keys(sd, '.encoder.layer.', _VIT_V4)
