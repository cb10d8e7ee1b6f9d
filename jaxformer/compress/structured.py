"""Structured pruning that shrinks the shapes: attention heads and FFN neurons (CATALOG H).

Every attention module loses `heads` query heads and every dense FFN `neurons` hidden units,
the same number in every layer, so a stacked (scanned) layer stack keeps one shape and the
result is the model of a smaller config (`model.attention.num_heads` / `num_kv_heads`,
`model.ffn.hidden_dim`; `head_dim` is written out so it does not follow d_model / num_heads).
Each layer chooses its own heads and neurons, by importance:

  head n      ||W^O_n||_2, the L2 norm of its slice of the output projection W^O [N, H, D]
  KV group k  sqrt(sum of ||W^O_n||^2 over its G = N / K query heads) (grouped-query
              attention prunes whole groups: K query-head groups and their K/V head; `heads`
              must be a multiple of G)
  neuron f    ||W2[f, :]||_2, the L2 norm of its row of the FFN's output matrix

(the magnitude criterion; a head or neuron whose output weights are small contributes little).
The lowest go (ties: the lower index first). Since y = sum_n head_n W^O_n and FFN(x) = h(x) W2,
removing a head or a neuron gives exactly the dense model with its slice of W^O, or row of W2,
set to zero (`masked`): the oracle the tests check.

Shapes: N query heads, K kv heads, H head dim, D model dim, F ffn dim; parameters are found by
their logical names ('heads', 'kv_heads', 'mlp') inside modules whose output matrix 'wo' is
[..., heads, head_dim, embed] or [..., mlp, embed]. Models whose head count means more than
the slices of these matrices are refused: attention kinds other than dot_product, ALiBi (its
slopes depend on N), MoE experts for neurons, and any parameter with a heads or mlp axis outside
such a module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.parallel.sharding import names_of
from jaxformer.parallel.state import abstract_model

HEAD_KINDS = ('dot_product',)


@dataclasses.dataclass(frozen=True)
class Choice:
  """What one module keeps: `axis` ('heads' / 'kv_heads' / 'mlp') -> sorted indices
  [batch..., kept] (batch = the module's stacked axes)."""
  keep: dict[str, np.ndarray]


def _flat(params: nnx.State) -> dict[tuple, nnx.Variable]:
  return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(params)}


def _modules(flat, kind: str) -> dict[tuple, int]:
  """{module path: number of batch axes} of the attention ('heads') or FFN ('mlp') modules."""
  out = {}
  for path, v in flat.items():
    names = names_of(v)
    if path[-1] != 'wo' or names is None:
      continue
    if kind == 'heads' and names[-3:] == ('heads', 'head_dim', 'embed'):
      out[path[:-1]] = len(names) - 3
    if kind == 'mlp' and names[-2:] == ('mlp', 'embed'):
      out[path[:-1]] = len(names) - 2
  return out


def _lowest_out(scores: np.ndarray, drop: int) -> np.ndarray:
  """Sorted indices [..., n - drop] of the largest scores along the last axis (ties: the
  lower index goes first)."""
  order = np.argsort(scores, axis=-1, kind='stable')
  return np.sort(order[..., drop:], axis=-1)


def check(cfg: ModelConfig, heads: int, neurons: int) -> int:
  """Refuses what cannot be pruned; returns G, the query heads per KV head."""
  n, k, f = cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_dim
  g = n // k
  if heads < 0 or neurons < 0:
    raise ConfigError(f'--heads={heads} / --neurons={neurons}: counts must be >= 0')
  if heads:
    if cfg.attention.kind not in HEAD_KINDS:
      raise ConfigError(f'--heads={heads}: model.attention.kind={cfg.attention.kind!r} is not '
                        f'pruned by heads (allowed kinds: {list(HEAD_KINDS)})')
    if cfg.position.kind == 'alibi':
      raise ConfigError(f'--heads={heads}: ALiBi slopes depend on the number of heads, so the '
                        'remaining heads would change; heads cannot be pruned')
    if heads % g:
      raise ConfigError(
          f'--heads={heads} is invalid: with grouped-query attention ({n} query heads sharing '
          f'{k} K/V heads, {g} per group) whole groups are pruned, so --heads must be a '
          f'multiple of {g}')
    if heads >= n:
      raise ConfigError(f'--heads={heads} is invalid: the model has {n} heads per layer; '
                        'prune fewer')
  if neurons:
    if cfg.moe.num_experts:
      raise ConfigError(f'--neurons={neurons}: MoE experts are not pruned by neurons')
    if neurons >= f:
      raise ConfigError(f'--neurons={neurons} is invalid: the FFN has {f} hidden units; '
                        'prune fewer')
  return g


def choose(cfg: ModelConfig, params: nnx.State, heads: int = 0, neurons: int = 0
           ) -> dict[tuple, Choice]:
  """{module path: what it keeps} for pruning `heads` heads and `neurons` neurons per layer."""
  g = check(cfg, heads, neurons)
  flat = _flat(params)
  out: dict[tuple, Choice] = {}
  if heads:
    for mod, nb in _modules(flat, 'heads').items():
      wo = np.asarray(flat[mod + ('wo',)].get_value(), np.float32)
      per_head = np.sum(wo ** 2, axis=(-2, -1))                          # [batch..., N]
      groups = np.sqrt(per_head.reshape(per_head.shape[:-1] + (-1, g)).sum(-1))  # [..., K]
      kv = _lowest_out(groups, heads // g)
      q = (kv[..., :, None] * g + np.arange(g)).reshape(kv.shape[:-1] + (-1,))
      out[mod] = Choice({'heads': q, 'kv_heads': kv})
      assert q.ndim == nb + 1
  if neurons:
    for mod in _modules(flat, 'mlp'):
      wo = np.asarray(flat[mod + ('wo',)].get_value(), np.float32)
      score = np.sqrt(np.sum(wo ** 2, axis=-1))                           # [batch..., F]
      keep = _lowest_out(score, neurons)
      prev = out.get(mod, Choice({})).keep
      out[mod] = Choice(dict(prev, mlp=keep))
  _check_covered(flat, out, heads, neurons)
  return out


def _check_covered(flat, choices, heads: int, neurons: int) -> None:
  axes = (('heads', 'kv_heads') if heads else ()) + (('mlp',) if neurons else ())
  for path, v in flat.items():
    names = names_of(v) or ()
    hit = [a for a in axes if a in names]
    if hit and path[:-1] not in choices:
      raise ConfigError(f'parameter {".".join(path)!r} has a {hit[0]!r} axis outside an '
                        'attention or FFN module this command prunes, so its shape would not '
                        'follow; this model cannot be pruned structurally')


def _take(x: np.ndarray, names: tuple, axis_name: str, idx: np.ndarray) -> np.ndarray:
  """x with only the indices `idx` [batch..., kept] along its `axis_name` axis."""
  a = names.index(axis_name)
  nb = idx.ndim - 1
  shape = idx.shape[:-1] + (1,) * (a - nb) + (idx.shape[-1],) + (1,) * (x.ndim - a - 1)
  return np.take_along_axis(x, idx.reshape(shape), axis=a)


def shrink(cfg: ModelConfig, params: nnx.State, choices: dict[tuple, Choice]
           ) -> tuple[ModelConfig, nnx.State]:
  """(the smaller config, its parameters): every module's parameters cut to what it keeps."""
  flat = _flat(params)
  new_cfg = smaller_config(cfg, choices)
  values = {}
  for path, v in flat.items():
    x = np.asarray(v.get_value())
    choice = choices.get(path[:-1])
    names = names_of(v) or ()
    if choice is not None:
      for axis, idx in choice.keep.items():
        if axis in names:
          x = _take(x, names, axis, idx)
    values[path] = x
  target = _flat(nnx.state(abstract_model(new_cfg), nnx.Param))
  if set(target) != set(values):
    raise AssertionError(f'the pruned model has other parameters: {set(target) ^ set(values)}')
  bad = [p for p in target if target[p].get_value().shape != values[p].shape]
  if bad:
    raise ConfigError(f'parameter {".".join(bad[0])!r} does not follow the pruned config '
                      f'(shape {values[bad[0]].shape}, the smaller model needs '
                      f'{target[bad[0]].get_value().shape}); this model cannot be pruned '
                      'structurally')
  flat_new = [(p, target[tuple(map(str, p))].replace(values[tuple(map(str, p))]))
              for p, _ in nnx.to_flat_state(nnx.state(abstract_model(new_cfg), nnx.Param))]
  return new_cfg, nnx.from_flat_state(flat_new)


def smaller_config(cfg: ModelConfig, choices: dict[tuple, Choice]) -> ModelConfig:
  """`cfg` with the kept numbers of heads, K/V heads and FFN units (head_dim written out)."""
  changes: dict[str, Any] = {}
  heads = [c.keep['heads'] for c in choices.values() if 'heads' in c.keep]
  if heads:
    a = cfg.attention
    kv = [c.keep['kv_heads'] for c in choices.values() if 'kv_heads' in c.keep][0]
    changes['attention'] = dataclasses.replace(
        a, num_heads=heads[0].shape[-1], head_dim=cfg.head_dim,
        num_kv_heads=None if a.num_kv_heads is None else kv.shape[-1])
  mlp = [c.keep['mlp'] for c in choices.values() if 'mlp' in c.keep]
  if mlp:
    changes['ffn'] = dataclasses.replace(cfg.ffn, hidden_dim=mlp[0].shape[-1])
  return cfg.replace(**changes)


def masked(params: nnx.State, choices: dict[tuple, Choice]) -> nnx.State:
  """The dense parameters with the pruned heads' slices of W^O and the pruned neurons' rows of
  W2 set to zero: the model the shrunk one must equal."""
  out = []
  for path, v in nnx.to_flat_state(params):
    key = tuple(map(str, path))
    choice = choices.get(key[:-1])
    x = np.asarray(v.get_value())
    if choice is not None and key[-1] == 'wo':
      names = names_of(v)
      for axis in ('heads', 'mlp'):
        if axis in choice.keep and axis in names:
          keep = np.zeros(x.shape[:names.index(axis) + 1], bool)
          idx = choice.keep[axis]
          np.put_along_axis(keep, idx, True, axis=-1)
          x = x * keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
    out.append((path, v.replace(x)))
  return nnx.from_flat_state(out)


def num_bytes(params: nnx.State) -> int:
  return sum(np.asarray(v.get_value()).nbytes for _, v in nnx.to_flat_state(params))
