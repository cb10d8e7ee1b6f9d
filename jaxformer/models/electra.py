"""ELECTRA (Clark et al. 2020): pre-training by replaced-token detection (CATALOG E2).

A small masked-LM generator fills the masked positions with samples; the discriminator, the
model that is kept, predicts for every token whether it was replaced. Both halves are encoders
(`models/encoder.py`) sharing one embedder: the token, position and type tables of width E and
their LayerNorm (ELECTRA's shared `electra/embeddings` scope); each half projects E to its own
width when they differ (`embeddings_project`).

    p_G(. | x~)   = softmax(MLM head(G(e(x~))))                  [B, T, V]   x~: masked input
    x^_t          ~ p_G(. | x~)_t  at masked t (temperature 1, no gradient);  x^_t = x_t elsewhere
    D(x^)_t       = RTD head(D(e(x^)))_t                          [B, T]      logit of "replaced"
    y_t           = [x^_t != x_t]  (a sample equal to the original counts as original)
    L             = CE_masked(p_G, x) + lambda * BCE(D(x^), y) over the non-padding tokens,
                    lambda = model.electra.disc_weight (50)

The gradient of the BCE term reaches the discriminator and the shared embeddings only: the
sample is discrete and drawn from stop_gradient(logits), so the generator learns from the MLM
term alone (the paper's Sec. 2; no REINFORCE). The sampling noise comes from the model's
'dropout' RNG stream, which the train step re-keys from (seed, step) like the dropout masks: a
resumed run draws the same replacements, and evaluation a fixed set.

Shape legend: B batch, T length, V vocabulary, E embedding width, D model width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxformer.config import ConfigError, ElectraConfig, ModelConfig, fail
from jaxformer.models.common import ModelOutput
from jaxformer.models.encoder import EncoderModel


def generator_config(cfg: ModelConfig) -> ModelConfig:
  """The generator: the discriminator's encoder config at the `model.electra` sizes with an MLM
  head (multi-head attention: the discriminator's kv heads need not divide its head count)."""
  e = cfg.electra
  d = e.generator_d_model or max(1, cfg.d_model // 4)
  heads = e.generator_num_heads or max(1, d // cfg.head_dim)
  ffn = e.generator_ffn_dim or max(1, cfg.ffn_hidden_dim * d // cfg.d_model)
  return dataclasses.replace(
      cfg, family='encoder', d_model=d, num_layers=e.generator_num_layers or cfg.num_layers,
      attention=dataclasses.replace(cfg.attention, num_heads=heads, num_kv_heads=None),
      ffn=dataclasses.replace(cfg.ffn, hidden_dim=ffn), embed_dim=cfg.embed_width,
      mlm_head=True, electra=ElectraConfig())


def discriminator_config(cfg: ModelConfig) -> ModelConfig:
  """The discriminator: the encoder `model` describes, with the replaced-token head."""
  return dataclasses.replace(cfg, family='encoder', embed_dim=cfg.embed_width, rtd_head=True,
                             electra=ElectraConfig())


def check_config(cfg: ModelConfig) -> None:
  e = cfg.electra
  for name in ('generator_d_model', 'generator_num_layers', 'generator_num_heads',
               'generator_ffn_dim'):
    value = getattr(e, name)
    if value is not None and value <= 0:
      fail(f'model.electra.{name}', value,
           'must be a positive integer or None (derived from the discriminator)')
  if not e.disc_weight > 0:
    fail('model.electra.disc_weight', e.disc_weight, 'must be > 0 (the paper uses 50)')
  for name in ('mlm_head', 'rtd_head', 'pooler', 'num_labels'):
    if getattr(cfg, name):
      fail(f'model.{name}', getattr(cfg, name),
           "must be unset for model.family='electra', which builds its own heads (an MLM "
           'head on the generator, a replaced-token head on the discriminator)')
  for half, make in (('generator', generator_config), ('discriminator', discriminator_config)):
    try:
      make(cfg).validate()
    except ConfigError as err:
      raise ConfigError(f'model.electra: the {half} derived from this config is invalid '
                        f'(see model.electra.generator_*): {err}') from err


@struct.dataclass
class RTDOutput:
  """One ELECTRA forward pass: generator logits [B, T, V] on the masked input, the corrupted
  tokens x^ [B, T], whether each was replaced [B, T] bool, discriminator logits [B, T]."""
  generator_logits: jax.Array
  corrupted: jax.Array
  replaced: jax.Array
  discriminator_logits: jax.Array
  aux: dict = struct.field(default_factory=dict)


class Electra(nnx.Module):
  """`__call__` runs the discriminator alone (logits [B, T], as ElectraForPreTraining);
  `replaced_token_detection` runs the pre-training pass."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.discriminator = EncoderModel(discriminator_config(cfg), rngs=rngs)
    # The generator borrows the discriminator's embedder (one set of parameters, whose paths
    # are discriminator.embedder.*).
    self.generator = EncoderModel(generator_config(cfg), embedder=self.discriminator.embedder,
                                  rngs=rngs)
    self.sample_rngs = rngs['dropout'].fork()

  def __call__(self, tokens, *, segment_ids=None, positions=None, token_types=None,
               deterministic: bool = True) -> ModelOutput:
    return self.discriminator(tokens, segment_ids=segment_ids, positions=positions,
                              token_types=token_types, deterministic=deterministic)

  def replaced_token_detection(self, inputs, originals, masked, *, segment_ids=None,
                               positions=None, token_types=None,
                               deterministic: bool = True) -> RTDOutput:
    """inputs: the masked tokens x~ [B, T]; originals: x [B, T]; masked: [B, T], nonzero where
    the generator fills in a sample."""
    kw = dict(segment_ids=segment_ids, positions=positions, token_types=token_types,
              deterministic=deterministic)
    gen = self.generator(inputs, **kw)
    sampled = jax.random.categorical(self.sample_rngs(), jax.lax.stop_gradient(gen.logits),
                                     axis=-1).astype(originals.dtype)
    corrupted = jnp.where(masked != 0, sampled, originals)
    disc = self.discriminator(corrupted, **kw)
    aux = {k: gen.aux.get(k, 0.0) + disc.aux.get(k, 0.0) for k in {*gen.aux, *disc.aux}}
    return RTDOutput(generator_logits=gen.logits, corrupted=corrupted,
                     replaced=corrupted != originals, discriminator_logits=disc.logits, aux=aux)
