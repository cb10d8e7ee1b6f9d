"""The `config.parallel` section: mesh shape, rules preset and overrides (CATALOG J).

  preset             dp | fsdp | tp | fsdp_tp | dp_fsdp_tp (jaxformer.parallel.rules): which
                     mesh axes the logical names map onto. Default dp_fsdp_tp: every axis has
                     its meaning, and the mesh sizes choose the layout.
  mesh               axis -> size within a slice (ICI) for the axes data, stage, fsdp, context,
                     expert, tensor; missing axes are 1, except 'data', which takes the rest of
                     the devices (-1) unless another axis does. One size may be -1.
  dcn_mesh           axis -> number of slices (TPU multi-slice) or processes (GPU / CPU
                     clusters) along it; the full mesh is mesh x dcn_mesh per axis. Data
                     parallelism over DCN keeps the slow links for the once-per-step gradient
                     reduction.
  rules              logical name -> mesh axes overriding the preset ('preset' keeps the preset's
                     entry; 'none' or '' replicates; 'data,fsdp' names several axes).
  sequence_parallel  shard the residual stream over its length on 'tensor' (Megatron-SP).
  layout             a named layout that sets mesh, preset and sequence_parallel in one switch:
                     '_'-joined <axis><size> tokens, axes dp (data), pp (stage), fsdp, cp
                     (context), ep (expert), tp (tensor), and 'sp' for sequence parallelism;
                     e.g. 'pp2_fsdp2_tp2', 'cp4_dp2', 'ep8', 'fsdp4_tp2_sp'. The preset is the one
                     whose axes are the SPMD axes named (dp, fsdp, tp); axes not named are 1.
                     Empty (the default): mesh and preset as given.
  pipeline.repeats   with a 'stage' axis of size S > 1 (pipeline parallelism): how many times
                     the micro-batches go round the stages; 1 is GPipe, R > 1 the circular
                     schedule with R S chunks of layers (jaxformer/parallel/pipeline.py). The
                     number of micro-batches is optim.grad_accum_steps.

A 'stage' axis of size > 1 is pipeline parallelism: the stacked layers are cut into stages over
it (`rules.preset_rules`); what a model and optimizer need for it is checked with the model
(`pipeline.check_config`).

A 'context' axis of size > 1 is context parallelism: every activation's length is split over it
(`rules.preset_rules`), and attention must be one of `CONTEXT_IMPLS` (checked with the model, in
`check_context`).

Everything here is checked before a model is built: unknown names, a rule naming a mesh axis
that does not exist, rules that put two dimensions of one activation on the same mesh axis, a
preset that leaves a mesh axis of size > 1 without a meaning, and device counts that do not fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxformer.config import ConfigError, check_choice, fail
from jaxformer.parallel import rules as rules_lib
from jaxformer.parallel.rules import MESH_AXES, PRESETS, Rules


def _ones() -> dict[str, int]:
  return {a: 1 for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """`parallel.pipeline`: see the module docstring."""
  repeats: int = 1


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """See the module docstring."""
  preset: str = 'dp_fsdp_tp'
  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(_ones(), data=-1))
  dcn_mesh: Mapping[str, int] = dataclasses.field(default_factory=_ones)
  rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sequence_parallel: bool = False
  pipeline: PipelineConfig = PipelineConfig()
  layout: str = ''

  def __post_init__(self):
    if self.layout:
      mesh, preset, sp = parse_layout(self.layout)
      object.__setattr__(self, 'mesh', mesh)
      object.__setattr__(self, 'preset', preset)
      object.__setattr__(self, 'sequence_parallel', sp)

  # ---------------------------------------------------------------- validation
  def validate(self) -> None:
    check_choice('parallel.preset', self.preset, PRESETS)
    ici, dcn = self.ici_sizes(), self.dcn_sizes()
    if self.pipeline.repeats < 1:
      fail('parallel.pipeline.repeats', self.pipeline.repeats, 'must be a positive integer')
    rules = self.logical_rules()
    rules_lib.check_mesh_axes(rules, MESH_AXES)
    rules.check_activation_layouts()
    if self.sequence_parallel and 'tensor' not in rules.axes(rules_lib.NORM_LENGTH):
      fail('parallel.sequence_parallel', True,
           f"needs a preset with tensor parallelism (parallel.preset={self.preset!r} maps "
           "nothing onto 'tensor'); use 'tp', 'fsdp_tp' or 'dp_fsdp_tp'")
    self._check_used({a: ici[a] * dcn[a] for a in MESH_AXES}, rules)

  def _check_used(self, sizes: Mapping[str, int], rules: Rules) -> None:
    """A mesh axis of size > 1 that no rule maps onto would replicate everything over it."""
    used = rules.used_axes()
    for axis in MESH_AXES:
      if sizes[axis] > 1 and axis not in used:
        users = [p for p, axes in rules_lib.PRESET_AXES.items() if axis in axes]
        fail(f'parallel.mesh.{axis}', sizes[axis],
             f'asks for {axis!r} parallelism, but parallel.preset={self.preset!r} (with '
             f'parallel.rules) maps nothing onto {axis!r}; use a preset that does '
             f'({users}) or set the size to 1')

  def _sizes(self, field: str, given: Mapping[str, int], default_rest: bool) -> dict[str, int]:
    sizes = dict(given)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
      raise ConfigError(f'parallel.{field}: unknown mesh axes {unknown}; the mesh axes are '
                        f'{list(MESH_AXES)}')
    for axis, size in sizes.items():
      if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
        fail(f'parallel.{field}.{axis}', size, 'must be a positive integer (or -1: the rest)')
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
      fail(f'parallel.{field}', sizes,
           f'at most one axis may be -1 ("the rest"), here {rest} are; give the others a size'
           + (' (data is -1 unless set: e.g. --config.parallel.mesh.data=1)'
              if 'data' in rest else ''))
    full = _ones()
    if default_rest and 'data' not in sizes and not rest:
      full['data'] = -1
    full.update(sizes)
    return full

  def _mesh_shown(self, ici):
    """The field and value to name for the ICI mesh: the layout when one set it."""
    return ('parallel.layout', self.layout) if self.layout else ('parallel.mesh', _shown(ici))

  def ici_sizes(self) -> dict[str, int]:
    return self._sizes('mesh', self.mesh, default_rest=True)

  def dcn_sizes(self) -> dict[str, int]:
    sizes = self._sizes('dcn_mesh', self.dcn_mesh, default_rest=False)
    if -1 in sizes.values():
      fail('parallel.dcn_mesh', dict(self.dcn_mesh), 'sizes must be explicit (no -1)')
    return sizes

  def axis_size(self, axis: str) -> int:
    """ICI x DCN size of a mesh axis; negative when its ICI size is -1 (the rest, known only
    with the device count)."""
    return self.ici_sizes()[axis] * self.dcn_sizes()[axis]

  @property
  def context_parallel(self) -> bool:
    """Whether the 'context' axis may be > 1 (-1, 'the rest', counts as yes)."""
    return self.axis_size('context') != 1

  @property
  def pipeline_parallel(self) -> bool:
    """Whether the 'stage' axis may be > 1 (-1, 'the rest', counts as yes)."""
    return self.axis_size('stage') != 1

  def logical_rules(self) -> Rules:
    return Rules.from_config(self.preset, self.rules,
                             sequence_parallel=self.sequence_parallel,
                             context_parallel=self.context_parallel,
                             pipeline_parallel=self.pipeline_parallel)

  # ---------------------------------------------------------------- devices
  def mesh_shape(self, num_devices: int) -> dict[str, int]:
    """The full mesh, axis -> size (ICI x DCN), in `MESH_AXES` order, for `num_devices`.

    Raises ConfigError naming the sizes and the device count when they do not fit.
    """
    ici, dcn = self.ici_sizes(), self.dcn_sizes()
    slices = math.prod(dcn.values())
    if num_devices % slices:
      fail('parallel.dcn_mesh', dict(self.dcn_mesh),
           f'asks for {slices} slices/processes, which do not divide the {num_devices} devices')
    per_slice = num_devices // slices
    fixed = math.prod(s for s in ici.values() if s != -1)
    if -1 in ici.values():
      axis = next(a for a, s in ici.items() if s == -1)
      if per_slice % fixed:
        fail(*self._mesh_shown(ici),
             f'the fixed axes multiply to {fixed}, which does not divide the {per_slice} '
             f'devices{" per slice" if slices > 1 else ""} ({num_devices} found), so '
             f'{axis!r} (-1) cannot take the rest')
      ici[axis] = per_slice // fixed
    elif fixed != per_slice:
      where = f' per slice ({num_devices} in all)' if slices > 1 else ''
      fail(*self._mesh_shown(ici),
           f'needs {fixed} devices, but {per_slice} {"are" if per_slice != 1 else "is"} '
           f'available{where}; make the sizes multiply to the device count, or let one axis '
           'be -1')
    sizes = {a: ici[a] * dcn[a] for a in MESH_AXES}
    self._check_used(sizes, self.logical_rules())
    return sizes


LAYOUT_AXES = {'dp': 'data', 'pp': 'stage', 'fsdp': 'fsdp', 'cp': 'context', 'ep': 'expert',
               'tp': 'tensor'}


def parse_layout(text: str) -> tuple[dict[str, int], str, bool]:
  """'pp2_fsdp2_tp2' -> (mesh sizes, preset, sequence_parallel); see `ParallelConfig`."""
  allowed = (f"'_'-joined tokens <axis><size> with axis in {list(LAYOUT_AXES)}, plus 'sp', "
             "e.g. 'pp2_fsdp2_tp2'")
  mesh, sp = {a: 1 for a in MESH_AXES}, False
  seen = set()
  for token in text.strip().split('_'):
    if token == 'sp':
      sp = True
      continue
    name = token.rstrip('0123456789')
    size = token[len(name):]
    if name not in LAYOUT_AXES or not size or int(size) < 1:
      fail('parallel.layout', text, f'has the token {token!r}; a layout is {allowed}')
    if name in seen:
      fail('parallel.layout', text, f'names {name!r} twice; a layout is {allowed}')
    seen.add(name)
    mesh[LAYOUT_AXES[name]] = int(size)
  # The smallest preset that uses every SPMD axis named (presets are listed smallest first).
  spmd = {a for a in ('data', 'fsdp', 'tensor') if mesh[a] > 1}
  preset = min((p for p, axes in rules_lib.PRESET_AXES.items() if spmd <= set(axes)),
               key=lambda p: len(rules_lib.PRESET_AXES[p]))
  return mesh, preset, sp


CONTEXT_IMPLS = ('ring', 'context_allgather')


def check_context(parallel: ParallelConfig, attention_impl: str, seq_len: int | None = None,
                  field: str = 'data.seq_len') -> None:
  """Refuses context parallelism with an attention impl that cannot split the sequence, and
  (when the context size is explicit) a `seq_len` its chunks do not divide (named `field`)."""
  if not parallel.context_parallel:
    return
  size = parallel.axis_size('context')
  if attention_impl not in CONTEXT_IMPLS:
    fail('model.attention.impl', attention_impl,
         f"parallel.mesh.context={size} splits every sequence over the 'context' mesh axis, "
         f'which needs a context-parallel attention: allowed values are {list(CONTEXT_IMPLS)}')
  per = 2 * size if attention_impl == 'ring' else size
  if size > 0 and seq_len is not None and seq_len % per:
    fail(field, seq_len,
         f'attention impl {attention_impl!r} with parallel.mesh.context={size} needs a '
         f'multiple of {per}' + (' (each device holds two of 2 x context chunks)'
                                 if attention_impl == 'ring' else ''))


def _shown(sizes: Mapping[str, int]) -> dict[str, int]:
  """The sizes a user set (axes of size 1 left out) for error messages."""
  return {a: s for a, s in sizes.items() if s != 1} or {'data': 1}


def default_section() -> dict[str, Any]:
  """The `parallel` section `default_config` writes: every field and every rule name present
  (rules as 'preset'), so each can be overridden from the command line."""
  cfg = ParallelConfig()
  return {'preset': cfg.preset, 'mesh': dict(cfg.mesh), 'dcn_mesh': dict(cfg.dcn_mesh),
          'rules': {name: rules_lib.FROM_PRESET for name in rules_lib.NAMES},
          'sequence_parallel': cfg.sequence_parallel,
          'pipeline': {'repeats': cfg.pipeline.repeats}, 'layout': cfg.layout}
