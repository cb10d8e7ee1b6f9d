"""Logical axis names and the rules that map them onto mesh axes (CATALOG J).

Models name the axes of every parameter and of the key activations; they never name a mesh axis.
A rule table maps each logical name to zero, one or several mesh axes; `Rules.spec(names)` turns
an array's names into a `PartitionSpec`.

Parameter names: 'embed', 'vocab', 'heads', 'kv_heads', 'head_dim', 'mlp', 'expert', 'layers',
'norm', 'position'. Activations have names of their own ('activation_*', the MaxText convention),
because a parameter and an activation with the same dimension are laid out differently: under
FSDP the model dimension of a weight is sharded over 'fsdp' while the model dimension of an
activation is whole and its batch is sharded over 'fsdp'.

Presets (`parallel.preset`), each the union of the pieces it names:
  data parallel (dp)     batch over 'data'; parameters replicated.
  fully sharded (fsdp)   batch over 'fsdp' too; every parameter's 'embed' dimension over 'fsdp'
                         (ZeRO-3: optimizer state follows the parameters, weights are gathered
                         layer by layer inside the scanned stack, gradients reduce-scattered).
  tensor parallel (tp)   Megatron: 'heads', 'kv_heads', 'mlp' and 'vocab' over 'tensor', so QKV
                         and FFN-in are column-parallel, the attention and FFN out-projections
                         row-parallel, the embedding and the logits vocab-parallel.
  sequence parallel      with `parallel.sequence_parallel`: the residual stream between those
                         regions (norms, dropout, residual adds) is sharded over its length on
                         'tensor' (Korthikanti et al. 2022): the all-reduce after a row-parallel
                         projection becomes a reduce-scatter and an all-gather.
  context parallel       with a 'context' mesh axis of size > 1 (any preset): every activation's
                         length ('activation_length', 'activation_norm_length') over 'context';
                         attention runs as ring attention or with gathered K/V
                         (jaxformer/attention/context.py), everything else is per token.
  pipeline parallel      with a 'stage' axis of size > 1 (any preset): the stacked layers'
                         leading 'layers' dimension and the pipeline's stage dimension
                         ('activation_stage') over 'stage' (jaxformer/parallel/pipeline.py).
The 'expert' dimension of MoE weights and activations always maps to the 'expert' axis (size 1
unless set). Explicit `parallel.rules` entries override single names of the preset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

from jaxformer.config import ConfigError, fail

# Mesh axes, outermost (slowest links: data parallel replicas, DCN) first and innermost (fastest
# links: tensor parallelism, the most frequent collectives) last.
MESH_AXES = ('data', 'stage', 'fsdp', 'context', 'expert', 'tensor')

PARAM_NAMES = ('embed', 'vocab', 'heads', 'kv_heads', 'head_dim', 'mlp', 'expert', 'layers',
               'norm', 'position')

BATCH = 'activation_batch'
LENGTH = 'activation_length'
NORM_LENGTH = 'activation_norm_length'
EMBED = 'activation_embed'
HEADS = 'activation_heads'
KV_HEADS = 'activation_kv_heads'
HEAD_DIM = 'activation_head_dim'
MLP = 'activation_mlp'
VOCAB = 'activation_vocab'
EXPERT = 'activation_expert'
STAGE = 'activation_stage'
ACTIVATION_NAMES = (BATCH, LENGTH, NORM_LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB,
                    EXPERT, STAGE)
NAMES = PARAM_NAMES + ACTIVATION_NAMES

# Every activation layout the models constrain, so rules can be checked before anything is built.
RESIDUAL = (BATCH, NORM_LENGTH, EMBED)            # [B, T, D] between the mixing layers
QUERIES = (BATCH, LENGTH, HEADS, HEAD_DIM)        # [B, T, N, H]
KEYS = (BATCH, LENGTH, KV_HEADS, HEAD_DIM)        # [B, S, K, H]
FFN_HIDDEN = (BATCH, LENGTH, MLP)                 # [B, T, F]
LOGITS = (BATCH, LENGTH, VOCAB)                   # [B, T, V]
ROUTER_LOGITS = (BATCH, LENGTH, None)             # [B, T, E]
EXPERT_TOKENS = (EXPERT, BATCH, None, EMBED)      # [E, B, C, D] dispatched tokens
EXPERT_HIDDEN = (EXPERT, BATCH, None, MLP)        # [E, B, C, F]
DENSE_EXPERT_HIDDEN = (BATCH, LENGTH, EXPERT, MLP)  # [B, T, E, F] dropless top-k
STAGE_RESIDUAL = (STAGE,) + RESIDUAL              # [S, B, T, D] pipeline stage inputs
ACTIVATION_LAYOUTS = {
    'residual stream': RESIDUAL, 'queries': QUERIES, 'keys and values': KEYS,
    'FFN hidden': FFN_HIDDEN, 'logits': LOGITS, 'router logits': ROUTER_LOGITS,
    'expert tokens': EXPERT_TOKENS, 'expert hidden': EXPERT_HIDDEN,
    'dense expert hidden': DENSE_EXPERT_HIDDEN, 'pipeline stage inputs': STAGE_RESIDUAL,
}

PRESET_AXES = {
    'dp': ('data',),
    'fsdp': ('data', 'fsdp'),
    'tp': ('data', 'tensor'),
    'fsdp_tp': ('fsdp', 'tensor'),
    'dp_fsdp_tp': ('data', 'fsdp', 'tensor'),
}
PRESETS = tuple(PRESET_AXES)
# The value of a `parallel.rules` entry that keeps the preset's mapping (the default that
# `default_config` writes for every name, so that each one can be overridden on the CLI).
FROM_PRESET = 'preset'

Axes = tuple[str, ...]


def preset_rules(preset: str, *, sequence_parallel: bool = False,
                 context_parallel: bool = False, pipeline_parallel: bool = False
                 ) -> dict[str, Axes]:
  """The rule table of a preset: every logical name -> a tuple of mesh axes (() = replicated).

  `context_parallel` (a 'context' axis of size > 1) puts the activation lengths on 'context',
  outside 'tensor' when sequence parallelism splits the residual stream further.
  """
  if preset not in PRESET_AXES:
    fail('parallel.preset', preset, f'allowed values are {list(PRESETS)}')
  uses = PRESET_AXES[preset]
  rules: dict[str, Axes] = {name: () for name in NAMES}
  rules[BATCH] = tuple(a for a in ('data', 'fsdp') if a in uses)
  if 'fsdp' in uses:
    rules['embed'] = ('fsdp',)
  if 'tensor' in uses:
    for param, act in (('heads', HEADS), ('kv_heads', KV_HEADS), ('mlp', MLP),
                       ('vocab', VOCAB)):
      rules[param] = rules[act] = ('tensor',)
    if sequence_parallel:
      rules[NORM_LENGTH] = ('tensor',)
  if context_parallel:
    rules[LENGTH] = ('context',)
    rules[NORM_LENGTH] = ('context',) + rules[NORM_LENGTH]
  if pipeline_parallel:
    rules['layers'] = rules[STAGE] = ('stage',)
  rules['expert'] = rules[EXPERT] = ('expert',)
  return rules


def parse_axes(field: str, value: Any) -> Axes | None:
  """A rule value as a tuple of mesh axes; None for `FROM_PRESET`.

  Accepted: None, '' or 'none' (replicated); 'fsdp'; 'data,fsdp' (the command-line form of
  several axes); a list or tuple of names.
  """
  if isinstance(value, str):
    text = value.strip()
    if text == FROM_PRESET:
      return None
    if text.lower() in ('', 'none'):
      return ()
    return tuple(a.strip() for a in text.split(','))
  if value is None:
    return ()
  if isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
    return tuple(value)
  fail(field, value, "must be a mesh axis name, several as 'a,b' or a list, or none")


class Rules(Mapping):
  """An immutable table: logical name -> tuple of mesh axes. Unknown names are replicated."""

  def __init__(self, table: Mapping[str, Sequence[str]]):
    self._table = {k: tuple(v) for k, v in table.items()}

  @classmethod
  def from_config(cls, preset: str, overrides: Mapping[str, Any] | None = None, *,
                  sequence_parallel: bool = False, context_parallel: bool = False,
                  pipeline_parallel: bool = False) -> 'Rules':
    table = preset_rules(preset, sequence_parallel=sequence_parallel,
                         context_parallel=context_parallel, pipeline_parallel=pipeline_parallel)
    for name, value in dict(overrides or {}).items():
      if name not in NAMES:
        raise ConfigError(f'parallel.rules.{name} is invalid: {name!r} is not a logical axis '
                          f'name; allowed names are {list(NAMES)}')
      axes = parse_axes(f'parallel.rules.{name}', value)
      if axes is not None:
        table[name] = axes
    return cls(table)

  def __getitem__(self, name: str) -> Axes:
    return self._table[name]

  def __iter__(self):
    return iter(self._table)

  def __len__(self) -> int:
    return len(self._table)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._table.items())))

  def __eq__(self, other) -> bool:
    return isinstance(other, Rules) and self._table == other._table

  def __repr__(self) -> str:
    used = {k: v for k, v in self._table.items() if v}
    return f'Rules({used})'

  def axes(self, name: str | None) -> Axes:
    return self._table.get(name, ()) if name is not None else ()

  def used_axes(self) -> set[str]:
    return {a for v in self._table.values() for a in v}

  def spec(self, names: Sequence[str | None], *, what: str = 'an array',
           sizes: Mapping[str, int] | None = None) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry `names`.

    Raises ConfigError when two of its dimensions map onto one mesh axis: a mesh axis can
    shard one dimension of an array, and dropping one of the two silently would hide a layout
    different from the one asked for. With `sizes`, mesh axes of size 1 are left out of the
    spec (they shard nothing).
    """
    seen: dict[str, str] = {}
    out = []
    for name in names:
      axes = self.axes(name)
      for a in axes:
        if a in seen:
          raise ConfigError(
              f'parallel.rules map two dimensions of {what} onto mesh axis {a!r}: '
              f'{seen[a]!r} -> {self.axes(seen[a])} and {name!r} -> {axes} (names '
              f'{tuple(names)}). A mesh axis can shard only one dimension of an array; change '
              f'parallel.rules.{name} or parallel.rules.{seen[a]}')
        seen[a] = name
      if sizes is not None:
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.sharding.PartitionSpec(*out)

  def check_activation_layouts(self) -> None:
    """Refuses rules under which some activation the models constrain would be ambiguous."""
    for what, names in ACTIVATION_LAYOUTS.items():
      self.spec(names, what=f'the {what} activation')


def check_mesh_axes(rules: Rules, axes: Iterable[str]) -> None:
  """Every axis a rule names must be a mesh axis."""
  axes = set(axes)
  for name, value in rules.items():
    bad = [a for a in value if a not in axes]
    if bad:
      fail(f'parallel.rules.{name}', value if len(value) != 1 else value[0],
           f'names mesh axes {bad} that do not exist; mesh axes are {list(MESH_AXES)}')
