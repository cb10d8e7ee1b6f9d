"""Model families: `build_model(cfg, rngs=...)` builds the `model.family` of the registry
(`models/registry.py`)."""

from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import act_quant
from jaxformer.models.common import ModelOutput
from jaxformer.models import registry
from jaxformer.models.families import family, family_dict, names as family_names


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> nnx.Module:
  """Builds the NNX module for `cfg.family` (validating the config first)."""
  cfg.validate()
  rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
  model = registry.get(cfg.family).build(cfg, rngs=rngs)
  if cfg.act_quant.bits:  # calibrated activation ranges (python -m jaxformer.compress quantize)
    act_quant.attach(model, cfg.act_quant.bits, cfg.act_quant.symmetric)
  return model


__all__ = ['ModelOutput', 'build_model', 'family', 'family_dict', 'family_names']
