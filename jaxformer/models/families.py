"""Model families as configurations of the same blocks (CATALOG E1-E7).

`family('llama', d_model=..., ...)` returns a validated ModelConfig; keyword overrides use the
ModelConfig field names, and nested sections may be given as dicts
(`attention={'num_kv_heads': 2}`), merged over the family's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxformer.config import ConfigError, ModelConfig

_FAMILIES: dict[str, dict[str, Any]] = {
    # Radford et al. 2019: learned positions, pre-LN, tanh GELU, biases, tied head.
    'gpt2': dict(
        family='decoder', norm='layernorm', norm_eps=1e-5, norm_position='pre',
        attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='learned'), ffn=dict(activation='gelu_tanh', bias=True),
        tie_embeddings=True, scaled_residual_init=True),
    # Touvron et al. 2023: RMSNorm, RoPE, SwiGLU, GQA, no biases, untied head.
    'llama': dict(
        family='decoder', norm='rmsnorm', norm_eps=1e-6, norm_bias=False, norm_position='pre',
        position=dict(kind='rope', rope_theta=10000.0),
        ffn=dict(activation='silu', gated=True, bias=False), tie_embeddings=False),
    # Jiang et al. 2023: LLaMA with a sliding window.
    'mistral': dict(
        family='decoder', norm='rmsnorm', norm_eps=1e-5, norm_bias=False,
        attention=dict(window=4096), position=dict(kind='rope', rope_theta=1e6),
        ffn=dict(activation='silu', gated=True, bias=False), tie_embeddings=False),
    # Jiang et al. 2024: Mistral with top-2 of 8 experts.
    'mixtral': dict(
        family='decoder', norm='rmsnorm', norm_eps=1e-5, norm_bias=False,
        position=dict(kind='rope', rope_theta=1e6),
        ffn=dict(activation='silu', gated=True, bias=False), tie_embeddings=False,
        moe=dict(num_experts=8, top_k=2, router='topk', normalize_top_k=True)),
    # Devlin et al. 2019: post-LN, learned positions, token types, embedding LN, MLM head.
    'bert': dict(
        family='encoder', norm='layernorm', norm_eps=1e-12, norm_position='post',
        final_norm=False, embed_norm=True, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='learned', max_length=512), ffn=dict(activation='gelu', bias=True),
        type_vocab_size=2, mlm_head=True, head_bias=True, tie_embeddings=True, max_length=512),
    # Liu et al. 2019: BERT without NSP/token types, positions offset by padding_idx + 1 = 2
    # (HF's max_position_embeddings=514 rows = 512 positions + the offset).
    'roberta': dict(
        family='encoder', norm='layernorm', norm_eps=1e-5, norm_position='post',
        final_norm=False, embed_norm=True, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='learned', offset=2, max_length=512),
        ffn=dict(activation='gelu', bias=True), type_vocab_size=1, mlm_head=True,
        head_bias=True, tie_embeddings=True, pad_id=1, max_length=512),
    # Clark et al. 2020: BERT's encoder as discriminator, a smaller MLM generator (model.electra)
    # sharing the embeddings (width model.embed_dim), replaced-token detection.
    'electra': dict(
        family='electra', norm='layernorm', norm_eps=1e-12, norm_position='post',
        final_norm=False, embed_norm=True, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='learned', max_length=512), ffn=dict(activation='gelu', bias=True),
        type_vocab_size=2, head_bias=True, tie_embeddings=True, max_length=512),
    # Raffel et al. 2020: RMSNorm, bucketed relative bias, no score scaling, ReLU, tied head
    # scaled by d^-0.5.
    't5': dict(
        family='encoder_decoder', norm='rmsnorm', norm_eps=1e-6, norm_bias=False,
        attention=dict(scale=1.0), position=dict(kind='t5'),
        ffn=dict(activation='relu', bias=False), tie_embeddings=True),
    # T5 v1.1: gated GELU (tanh), untied head.
    't5_v1_1': dict(
        family='encoder_decoder', norm='rmsnorm', norm_eps=1e-6, norm_bias=False,
        attention=dict(scale=1.0), position=dict(kind='t5'),
        ffn=dict(activation='gelu_tanh', gated=True, bias=False), tie_embeddings=False),
    # Lewis et al. 2020: post-LN, learned positions offset 2, embedding LN, final logits bias.
    'bart': dict(
        family='encoder_decoder', norm='layernorm', norm_eps=1e-5, norm_position='post',
        final_norm=False, embed_norm=True, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='learned', offset=2, max_length=1024),
        ffn=dict(activation='gelu', bias=True), tie_embeddings=True, head_bias=True,
        pad_id=1, max_length=1024),
    # Vaswani et al. 2017: post-LN, sinusoidal, ReLU, sqrt(d) embedding scale, shared embeddings.
    'transformer': dict(
        family='encoder_decoder', norm='layernorm', norm_eps=1e-6, norm_position='post',
        final_norm=False, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='sinusoidal'), ffn=dict(activation='relu', bias=True),
        embed_scale=True, tie_embeddings=True, init='xavier'),
    # Dosovitskiy et al. 2021: pre-LN encoder over patches, CLS token, learned positions.
    'vit': dict(
        family='vit', norm='layernorm', norm_eps=1e-12, norm_position='pre',
        attention=dict(qkv_bias=True, out_bias=True), position=dict(kind='none'),
        ffn=dict(activation='gelu', bias=True), pooler=True),
    # Bahdanau et al. 2015 / Luong et al. 2015 baseline.
    'rnn': dict(family='rnn_seq2seq', position=dict(kind='none'), scan_layers=False),
    # Kitaev et al. 2020: shared-QK LSH attention, reversible layers, chunked FFN, pre-LN.
    # Learned absolute positions stand in for the paper's axial ones.
    'reformer': dict(
        family='decoder', norm='layernorm', norm_position='pre',
        attention=dict(kind='lsh'), position=dict(kind='learned'),
        ffn=dict(activation='gelu', bias=True, chunk_size=64), reversible=True,
        tie_embeddings=True),
    # Dai et al. 2019: segment recurrence with relative positions (own attention), pre-LN here.
    'transformer_xl': dict(
        family='transformer_xl', norm='layernorm', norm_position='pre',
        position=dict(kind='none'), ffn=dict(activation='relu', bias=True),
        tie_embeddings=True, memory_length=64, scan_layers=False),
    # Jaegle et al. 2021: latents cross-attend to the inputs, pre-LN, GELU MLPs, learned
    # positions for token inputs (Fourier features for images are built in).
    'perceiver': dict(
        family='perceiver', norm='layernorm', norm_position='pre',
        attention=dict(qkv_bias=True, out_bias=True), position=dict(kind='learned'),
        ffn=dict(activation='gelu', bias=True)),
}


# Defaults computed from the other fields, applied unless overridden.
_DERIVED = {
    # The tied head reads h * d_model**-0.5 (HF T5 `scale_decoder_outputs`, which transformers
    # derives from tie_word_embeddings); T5 v1.1 is untied and unscaled.
    't5': lambda d: {'logits_scale': d.get('d_model', ModelConfig.d_model) ** -0.5
                     if d.get('tie_embeddings', True) else None},
}


def names() -> list[str]:
  return sorted(_FAMILIES)


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out


def family_dict(name: str, **overrides) -> dict[str, Any]:
  if name not in _FAMILIES:
    raise ConfigError(f'model family {name!r} is invalid: allowed values are {names()}')
  overrides = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
               for k, v in overrides.items()}
  merged = _merge(_FAMILIES[name], overrides)
  for k, v in _DERIVED.get(name, lambda d: {})(merged).items():
    merged.setdefault(k, v)
  return merged


def family(name: str, **overrides) -> ModelConfig:
  """A validated ModelConfig for a named family with field overrides."""
  return ModelConfig.from_dict(family_dict(name, **overrides))
