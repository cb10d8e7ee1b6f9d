"""Does a checkpoint fit an experiment's model config? (`finetune.init_from`, CATALOG K)

Two checks, both before any tensor is placed:

  * config: the model the checkpoint describes (an HF config converted by
    `jaxformer.interop.hf`, or a jaxformer run's saved `config.model`) must equal the
    experiment's `model` section on every field that changes what the imported weights compute
    (family, sizes, heads, activation, norms, positions, eps, ...). `FREE_FIELDS` lists what an
    experiment may choose for itself: regularisation, precision, remat / scan, kernels, context
    length and RoPE scaling, and the task heads and PEFT modules it adds (`HEAD_FIELDS`,
    `ADDED_SECTIONS`), whose parameters start fresh.
  * shapes: every parameter taken from the checkpoint must have the target's shape; the error
    names the path, both shapes and, from the axis's logical name, the config field to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxformer.config import ConfigError, ModelConfig

# Fields whose parameters a checkpoint may lack (task heads an experiment adds on an imported
# body) or have in excess (heads it drops): they come from the checkpoint when it has them.
HEAD_FIELDS = ('num_labels', 'mlm_head', 'pooler', 'rtd_head')
# Sections whose parameters no imported checkpoint has (PEFT modules: adapters, prefixes,
# prompts); they start fresh. Absent from ModelConfig until the PEFT work adds them.
ADDED_SECTIONS = ('peft',)
FREE_FIELDS = frozenset({
    *HEAD_FIELDS, *ADDED_SECTIONS,
    'max_length', 'pad_id', 'embed_dropout', 'residual_dropout', 'drop_path', 'init', 'init_std',
    'scaled_residual_init', 'scan_layers', 'scan_unroll', 'remat', 'dtype', 'param_dtype',
    'segment_length',
    'attention.impl', 'attention.dropout',
    'position.max_length', 'position.rope_scaling', 'position.rope_scaling_factor',
    'position.rope_original_max_length',
    'ffn.dropout', 'ffn.chunk_size',
    'moe.capacity_factor', 'moe.load_balance_weight', 'moe.z_loss_weight', 'moe.jitter',
    'moe.dispatch',
    'mamba.scan', 'electra.disc_weight',
})

# logical axis name -> the model field that sets that dimension
AXIS_FIELDS = {
    'vocab': 'model.vocab_size', 'embed': 'model.d_model', 'mlp': 'model.ffn.hidden_dim',
    'heads': 'model.attention.num_heads', 'kv_heads': 'model.attention.num_kv_heads',
    'head_dim': 'model.attention.head_dim', 'layers': 'model.num_layers',
    'position': 'model.position.max_length (and model.max_length)',
    'expert': 'model.moe.num_experts',
}


def _fields(x: Any, prefix: str = '') -> dict[str, Any]:
  """{dotted field: value} of a config dataclass, sections flattened."""
  out = {}
  for f in dataclasses.fields(x):
    value = getattr(x, f.name)
    name = prefix + f.name
    if dataclasses.is_dataclass(value) and name not in ADDED_SECTIONS:
      out.update(_fields(value, name + '.'))
    else:
      out[name] = value
  return out


def differences(source: ModelConfig, target: ModelConfig) -> list[tuple[str, Any, Any]]:
  """(field, target value, source value) for every non-free field where the two differ."""
  a, b = _fields(source), _fields(target)
  return [(k, b.get(k), a.get(k)) for k in sorted(set(a) | set(b))
          if k not in FREE_FIELDS and a.get(k) != b.get(k)]


def check_fits(source: ModelConfig, target: ModelConfig, where: str) -> None:
  """Raises ConfigError listing every field on which the checkpoint's model (`source`) and
  the experiment's (`target`) differ, with the value to set."""
  diffs = differences(source, target)
  if not diffs:
    return
  if source.family != target.family:
    raise ConfigError(
        f"{where} holds a model of family {source.family!r}, but model.family="
        f"{target.family!r}: set the model section from the checkpoint "
        '(jaxformer.finetune.model_section(path)) or choose a checkpoint of that family')
  listed = '; '.join(f'model.{k}={t!r} (the checkpoint has {s!r})' for k, t, s in diffs)
  raise ConfigError(
      f'{where} does not fit the model config: {listed}. Set these fields to the '
      "checkpoint's values (jaxformer.finetune.model_section(path) gives the whole model "
      'section)')


def axis_field(path: str, axis: str | None) -> str:
  """The config field that sets dimension `axis` of the parameter at `path`."""
  parts = path.split('.')
  if axis == 'vocab' and 'token_types' in parts:
    return 'model.type_vocab_size'
  if axis == 'layers' and 'decoder' in parts:
    return 'model.num_decoder_layers'
  if axis is None and parts[0] == 'classifier':
    return 'model.num_labels'
  return AXIS_FIELDS.get(axis, f'the model field behind axis {axis!r}')


def check_shape(path: str, source_shape: Sequence[int], target_shape: Sequence[int],
                names: Sequence[str | None] | None, where: str) -> None:
  """Raises ConfigError naming the parameter, both shapes and the field to change."""
  source_shape, target_shape = tuple(source_shape), tuple(target_shape)
  if source_shape == target_shape:
    return
  hint = ''
  if names is not None and len(source_shape) == len(target_shape) == len(names):
    fixes = [f'{axis_field(path, n)}={s} (axis {n!r})'
             for n, s, t in zip(names, source_shape, target_shape) if s != t]
    hint = f': set {", ".join(fixes)}'
  raise ConfigError(
      f"{where}: parameter '{path}' has shape {source_shape} in the checkpoint but "
      f'{target_shape} in the model{hint}')
