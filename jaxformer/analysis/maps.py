"""Attention maps per layer and head (CATALOG I): the probabilities every attention core used.

    A[l, b, n, t, s] = softmax_s(q_t . k_s scaled, biased, masked)   (layer l, head n)

Shapes: L layers, B batch, N query heads, T queries, S keys.

`attention_maps(model, fn)` runs `fn(model')` once on a copy of the model whose cores sow their
probabilities (`jaxformer.attention.set_sow_weights`, 'attention_weights' as nnx.Intermediate)
and returns them grouped by attention site: 'stack/self_attn' for a decoder or encoder,
'encoder/self_attn', 'decoder/self_attn' and 'decoder/cross_attn' for an encoder-decoder, each
an `AttentionMap` with the layer numbers and the weights [L, B, N, T, S].

Scanned stacks (`model.scan_layers`, the default) and unrolled ones give the same maps: the
values sown inside `nnx.scan` come out stacked over the scanned layer groups, and group g's
block i is layer g * period + i (models/stack.py). The sown values are read as the core's
variables after the call (flax's `Module.sow` outside `nnx.capture`): `nnx.capture` puts a
`__captures__` attribute on every submodule, which the stack's `nnx.split` / `nnx.scan` of its
layer groups cannot flatten (flax 0.12.8, "Comparator raised exception while sorting pytree
dictionary keys"), so capture is not used. Flax's deprecation warning for sow outside capture is
silenced here for that reason.

Refused, with a `ConfigError`: an attention kind that never forms [T, S] probabilities (the
registry's 'weights' feature and its reason: flash kernels, linear / low-rank / sparse kinds)
and a family whose layers compute their own attention (Funnel, Transformer-XL: `own_layers`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxformer.attention import registry, set_sow_weights
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.layers.ffn import set_sow_hidden
from jaxformer.models.stack import layer_period


@struct.dataclass
class AttentionMap:
  """The maps of one attention site: `layers[i]` is the layer of `weights[i]` [B, N, T, S]. A
  pytree (name and layers static), so `nnx.jit` can return it."""
  weights: jax.Array
  name: str = struct.field(pytree_node=False, default='')
  layers: tuple[int, ...] = struct.field(pytree_node=False, default=())


def check_weights(cfg: ModelConfig, field: str = 'model.attention') -> None:
  """Refuses a model whose attention cannot return its probabilities, naming why."""
  fam = cfg.family_spec
  if fam.own_layers is not None and not fam.shared_attention:
    raise ConfigError(f'model.family={cfg.family!r} cannot give attention weights: '
                      f'{fam.own_layers}')
  registry.require(cfg.attention, {'weights'}, where=field)


def attention_maps(model: nnx.Module, fn: Callable[[nnx.Module], object]
                   ) -> dict[str, AttentionMap]:
  """Runs `fn(model')` (one forward pass) and returns {site: AttentionMap}; see the docstring.

  The structure of `model` is not changed (its cores do not sow afterwards); its variables
  advance as a call of `fn(model)` would advance them (dropout counters).
  """
  return run_with_maps(model, fn)[1]


def run_with_maps(model: nnx.Module, fn: Callable[[nnx.Module], object]
                  ) -> tuple[object, dict[str, AttentionMap]]:
  """(fn(model'), its maps): `attention_maps` that also returns what fn returned (the training
  loss, whose gradient flows through model' to the parameters of `model`)."""
  cfg: ModelConfig = model.cfg
  check_weights(cfg)
  result, sown = run_sowing(model, fn, ('attention_weights',))
  return result, as_maps(sown['attention_weights'])


def as_maps(sites: dict[str, tuple[tuple[int, ...], jax.Array]]) -> dict[str, AttentionMap]:
  """`run_sowing`'s 'attention_weights' as {site: AttentionMap}."""
  return {name: AttentionMap(w, name, layers) for name, (layers, w) in sites.items()}


# Which modules sow what, and the switch that turns them on.
SOWERS = {'attention_weights': set_sow_weights, 'hidden': set_sow_hidden}


def run_sowing(model: nnx.Module, fn: Callable[[nnx.Module], object], what: tuple[str, ...]
               ) -> tuple[object, dict[str, dict[str, tuple[tuple[int, ...], jax.Array]]]]:
  """(fn(model'), {what: {site: (layers, values [L, ...])}}) with model' a copy of `model`
  whose modules sow `what` ('attention_weights': attention cores' probabilities; 'hidden': the
  dense FFNs' hidden activations) once each; sites and layer numbers as in the module
  docstring. Raises ConfigError when no module of the model sows one of `what`."""
  cfg: ModelConfig = model.cfg
  graphdef, state = nnx.split(model)
  m = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
  for name in what:
    if not SOWERS[name](m, True):
      raise ConfigError(f'model.family={cfg.family!r} (model.attention.kind='
                        f'{cfg.attention.kind!r}) has no module that gives {name!r}')
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', 'Using .Module.sow', DeprecationWarning)
    result = fn(m)
  sown = nnx.pop(m, nnx.Intermediate)
  nnx.update(model, nnx.state(m))
  period = layer_period(cfg)
  out = {}
  for name in what:
    sites = _by_site(sown, name, period)
    if not sites:
      raise ConfigError(f'model.family={cfg.family!r} with model.attention.kind='
                        f'{cfg.attention.kind!r} sowed no {name!r}')
    out[name] = {site: (tuple(i for i, _ in items),
                        jnp.stack([w for _, w in items]).astype(jnp.float32))
                 for site, items in sorted(sites.items())}
  return result, out


def _by_site(sown, leaf: str, period: int) -> dict[str, list[tuple[int, jax.Array]]]:
  """{site: [(layer, value)] sorted by layer} of the values sown under `leaf`."""
  sites: dict[str, list[tuple[int, jax.Array]]] = {}
  for path, value in nnx.to_flat_state(sown):
    if path[-1] != leaf:
      continue
    calls = value.get_value()
    if len(calls) != 1:
      raise ValueError(f'{"/".join(map(str, path))} was sown {len(calls)} times: fn must call '
                       'the model once')
    w = calls[0]
    # The module's path: an attention core sits under its Attention ('.../self_attn/core').
    site = [str(p) for p in (path[:-2] if path[-2] == 'core' else path[:-1])]
    if 'layers' in path:
      i = path.index('layers')
      block = path[i + 2]  # layers / blocks / <i> / ...
      name = '/'.join(site[:i] + site[i + 3:])
      for g in range(w.shape[0]):
        sites.setdefault(name, []).append((g * period + int(block), w[g]))
    else:
      sites.setdefault('/'.join(site), []).append((0, w))
  for items in sites.values():
    items.sort(key=lambda x: x[0])
  return sites


def self_attention(maps: dict[str, AttentionMap]) -> AttentionMap:
  """The map of the model's (source) self-attention: 'stack/self_attn', else
  'encoder/self_attn', else the only site."""
  for name in ('stack/self_attn', 'encoder/self_attn'):
    if name in maps:
      return maps[name]
  selfs = [m for n, m in maps.items() if n.endswith('self_attn')]
  if len(selfs) == 1:
    return selfs[0]
  raise ValueError(f'no single self-attention site among {sorted(maps)}')
