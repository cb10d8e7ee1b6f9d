"""Model families: `build_model(cfg, rngs=...)` dispatches on `model.family`."""

from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import ModelOutput
from jaxformer.models.families import family, family_dict, names as family_names


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> nnx.Module:
  """Builds the NNX module for `cfg.family` (validating the config first)."""
  cfg.validate()
  rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
  if cfg.family in ('decoder', 'mamba'):
    from jaxformer.models.decoder import DecoderLM
    return DecoderLM(cfg, rngs=rngs)
  if cfg.family == 'encoder':
    from jaxformer.models.encoder import EncoderModel
    return EncoderModel(cfg, rngs=rngs)
  if cfg.family == 'encoder_decoder':
    from jaxformer.models.encoder_decoder import EncoderDecoder
    return EncoderDecoder(cfg, rngs=rngs)
  if cfg.family == 'vit':
    from jaxformer.models.vit import ViT
    return ViT(cfg, rngs=rngs)
  if cfg.family == 'rnn_seq2seq':
    from jaxformer.models.rnn_seq2seq import RNNSeq2Seq
    return RNNSeq2Seq(cfg, rngs=rngs)
  if cfg.family == 'transformer_xl':
    from jaxformer.models.transformer_xl import TransformerXL
    return TransformerXL(cfg, rngs=rngs)
  if cfg.family == 'perceiver':
    from jaxformer.models.perceiver import Perceiver
    return Perceiver(cfg, rngs=rngs)
  raise AssertionError(cfg.family)


__all__ = ['ModelOutput', 'build_model', 'family', 'family_dict', 'family_names']
