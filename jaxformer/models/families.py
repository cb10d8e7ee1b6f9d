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
    # Liu et al. 2021: Swin-T's shape (C = 96, depths 2-2-6-2, heads 3-6-12-24, 7 x 7 windows,
    # 4 x 4 patches); shifted windows with a relative position bias, pre-LN, patch merging,
    # average pool. `num_layers` follows the depths (derived below).
    'swin': dict(
        family='swin', norm='layernorm', norm_eps=1e-5, norm_position='pre', d_model=96,
        attention=dict(num_heads=3, qkv_bias=True, out_bias=True), position=dict(kind='none'),
        ffn=dict(activation='gelu', bias=True), scan_layers=False, image_size=224,
        patch_size=4, swin=dict(depths=(2, 2, 6, 2), window_size=7)),
    # Bahdanau et al. 2015 / Luong et al. 2015 baseline.
    'rnn': dict(family='rnn_seq2seq', position=dict(kind='none'), scan_layers=False),
    # Kitaev et al. 2020: shared-QK LSH attention, reversible layers, chunked FFN, pre-LN.
    # Learned absolute positions stand in for the paper's axial ones.
    'reformer': dict(
        family='decoder', norm='layernorm', norm_position='pre',
        attention=dict(kind='lsh'), position=dict(kind='learned'),
        ffn=dict(activation='gelu', bias=True, chunk_size=64), reversible=True,
        tie_embeddings=True),
    # Gu & Dao 2023: Mamba layers (selective SSM, no attention, no FFN), pre-RMSNorm, no
    # positions, tied head (HF MambaForCausalLM). `mamba=dict(attention_every=k, ffn=True)`
    # makes a hybrid with attention + FFN in every k-th layer and FFNs in the others (Jamba).
    'mamba': dict(
        family='mamba', norm='rmsnorm', norm_eps=1e-5, norm_bias=False, norm_position='pre',
        position=dict(kind='none'), tie_embeddings=True),
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
    # Dai et al. 2020: blocks of post-LN layers with mean pooling in between, relative
    # positions and token types inside attention, embedding LayerNorm, tanh GELU, decoder of 2
    # layers over the up-sampled output (HF FunnelConfig defaults: B4-4-4, eps 1e-9).
    'funnel': dict(
        family='funnel', norm='layernorm', norm_eps=1e-9, norm_position='post',
        final_norm=False, embed_norm=True, attention=dict(qkv_bias=True, out_bias=True),
        position=dict(kind='none'), ffn=dict(activation='gelu_tanh', bias=True),
        num_layers=12, num_decoder_layers=2, funnel=dict(block_sizes=(4, 4, 4)),
        tie_embeddings=True, head_bias=True, scan_layers=False),
    # Gulati et al. 2020: macaron half-step swish FFNs (4x), MHSA, convolution module (kernel
    # 31, LayerNorm: BatchNorm is refused, see models/conformer.py), pre-LN, final LN per block.
    # RoPE stands in for Transformer-XL relative positions (relative, and every attention kind
    # and cached decoding take it). `conformer` is the encoder, `conformer_lm` the causal LM.
    'conformer': dict(
        family='conformer', norm='layernorm', norm_position='pre', final_norm=False,
        position=dict(kind='rope'), ffn=dict(activation='silu', bias=True),
        conformer=dict(kernel_size=31, norm='layernorm'), pooler=True),
    'conformer_lm': dict(
        family='conformer_lm', norm='layernorm', norm_position='pre', final_norm=False,
        position=dict(kind='rope'), ffn=dict(activation='silu', bias=True),
        conformer=dict(kernel_size=31, norm='layernorm'), tie_embeddings=True),
}


# Defaults computed from the other fields, applied unless overridden.
_DERIVED = {
    # The tied head reads h * d_model**-0.5 (HF T5 `scale_decoder_outputs`, which transformers
    # derives from tie_word_embeddings); T5 v1.1 is untied and unscaled.
    't5': lambda d: {'logits_scale': d.get('d_model', ModelConfig.d_model) ** -0.5
                     if d.get('tie_embeddings', True) else None},
    # Swin's blocks are its stages' depths.
    'swin': lambda d: {'num_layers': sum(d.get('swin', {}).get('depths', (2, 2)))},
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
