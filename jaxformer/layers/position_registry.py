"""Position kinds by name: `model.position.kind` -> a `PositionKind` with hooks (CATALOG C1-C7).

Position information enters a Transformer at three places, and a kind implements the hooks of
the places it uses; the others are no-ops, so the model code calls every hook of every kind:

  embedding  `embedding_params(rngs=)` -> module or None, kept as `TokenEmbedder.positions`;
             `embed(params, positions [B|1, T])` -> [B|1, T, D] added to the token embeddings
             (sinusoidal, learned).
  stack      `stack_params(causal=, rngs=)` -> module or None, kept as `Stack.position_bias`
             and shared by every layer; `stack_bias(params)` -> a `RelativeBias` (a function of
             query and key positions) or None (T5 buckets, ALiBi). The stack evaluates it at the
             attended positions, or hands the function itself to a core that evaluates it tile
             by tile (`takes_relative_bias`: ring attention).
  attention  in every self-attention layer: `attention_params(rngs=)` -> module or None, kept
             under the kind's name (`self_attn.shaw`); `rotate(x [B, T, N|K, H], positions)` of
             q and of k, before k enters the KV cache (RoPE); `attention_terms(params, q,
             q_positions, kv_positions, scale)` -> (bias [B, N, T, S] added to the logits or
             None, `value_bias_fn` or None) (Shaw). Cross-attention takes kind 'none'.

Declared facts the rest of the code asks for:
  `attention_features`  registry features (jaxformer/attention/registry.py) the self-attention
                        core must provide ('bias', 'shaw'), checked when a layer is built; this
                        is how ring / context-parallel attention refuses what it cannot do.
  `shift_invariant`     attention depends on positions only through t - s, so shifting every
                        position by a constant changes nothing (tested for every kind).
  `acts_in_attention()` whether any stack or attention hook is implemented (families whose
                        attention has no positions, such as the Perceiver's latents or a stack
                        of Mamba layers alone, accept only `embedding_only()` kinds).
  `validate(cfg)`       per-kind checks of `model.position.*`, run by `ModelConfig.validate`.

Every hook takes explicit positions (the new tokens' positions when decoding, the cache slots'
positions for keys), so KV-cached decoding and left-padded prompts need no hook of their own.

A new kind is one file: a `PositionKind` subclass decorated with `@register('name')`, plus its
module's name in `MODULES`; tests/layers/test_position_kinds.py then tests it by itself.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import ClassVar

from jaxformer.config import ConfigError, ModelConfig

# Modules that register the kinds (imported on first use, so that `jaxformer.config` can ask
# for the names without importing flax modules when it is imported).
MODULES = ('jaxformer.layers.positions',)

_REGISTRY: dict[str, type[PositionKind]] = {}


@dataclasses.dataclass(frozen=True)
class PositionKind:
  """The hooks of one position kind for one model config; every hook is a no-op here.

  Instances are immutable and compare by value, so modules keep them as static attributes.
  """
  cfg: ModelConfig

  name: ClassVar[str] = ''
  attention_features: ClassVar[frozenset[str]] = frozenset()
  shift_invariant: ClassVar[bool] = False

  @classmethod
  def validate(cls, cfg: ModelConfig) -> None:
    """Raises ConfigError (naming the dotted field) for settings this kind cannot use."""

  @classmethod
  def acts_in_attention(cls) -> bool:
    return any(getattr(cls, hook) is not getattr(PositionKind, hook) for hook in
               ('stack_params', 'stack_bias', 'attention_params', 'rotate', 'attention_terms'))

  # ---------------------------------------------------------------- embedding
  def embedding_params(self, *, rngs):
    return None

  def embed(self, params, positions):
    return None

  # ---------------------------------------------------------------- stack
  def stack_params(self, *, causal: bool, rngs):
    return None

  def stack_bias(self, params):
    return None

  # ---------------------------------------------------------------- attention
  def attention_params(self, *, rngs):
    return None

  def rotate(self, x, positions):
    return x

  def attention_terms(self, params, q, q_positions, kv_positions, scale):
    return None, None


def register(name: str) -> Callable[[type[PositionKind]], type[PositionKind]]:
  """Class decorator registering a `PositionKind` subclass as `model.position.kind=name`."""

  def deco(cls):
    if not name.isidentifier():
      raise ValueError(f'position kind {name!r} must be an identifier: its per-layer parameters '
                       'are stored under that name')
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f'position kind {name!r} registered twice')
    if not issubclass(cls, PositionKind):
      raise TypeError(f'{cls.__name__} must subclass PositionKind')
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return deco


def _ensure_loaded() -> None:
  for module in MODULES:
    importlib.import_module(module)


def kinds() -> list[str]:
  _ensure_loaded()
  return sorted(_REGISTRY)


def lookup(name: str) -> type[PositionKind]:
  _ensure_loaded()
  if name not in _REGISTRY:
    raise ConfigError(f'model.position.kind={name!r} is invalid: allowed values are {kinds()}')
  return _REGISTRY[name]


def embedding_only() -> list[str]:
  """The kinds that act at the embedding alone (for stacks whose layers have no attention)."""
  return [k for k in kinds() if not lookup(k).acts_in_attention()]


def of(cfg: ModelConfig, *, cross: bool = False) -> PositionKind:
  """The hooks of `cfg.position.kind` (of 'none' for cross-attention, whose keys come from
  another sequence)."""
  return lookup('none' if cross else cfg.position.kind)(cfg)
