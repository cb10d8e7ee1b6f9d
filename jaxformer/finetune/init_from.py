"""The parameters a fine-tuning run starts from: `finetune.init_from` (CATALOG K).

    params, fresh = load_initial_params(path, exp.model, program.abstract_state['params'],
                                        layout)

`path` is one of
  * a jaxformer run folder (its newest readable checkpoint) or one of its
    `checkpoints/<step>` folders: only the parameters are read from the Orbax checkpoint
    (a partial restore: no optimizer moments), straight into the target shardings, and checked
    against the checksums saved with them;
  * a local Hugging Face directory (config.json + *.safetensors), or
  * a .safetensors file with the config.json of its model next to it,
    both converted by `jaxformer.interop.hf` (its per-family rule tables), each tensor placed
    from the host straight into its shards.

Before any tensor is placed, the checkpoint's model must fit the experiment's `model` section
(`jaxformer.finetune.fit`): a different family or size fails with a ConfigError naming every
field to change, and a tensor whose shape differs from its parameter's names the parameter
path, both shapes and the field to change. Parameters the checkpoint's model does not have but
the experiment's does (a task head it adds: `model.num_labels` on an imported encoder, an MLM
head on a bare encoder; PEFT modules) keep their fresh initialisation (the same values
`build_model(model, seed=seed)` gives them) and are logged and returned as `fresh`; any other
missing parameter is an error. Heads the checkpoint has and the experiment drops (an MLM or LM
head under a classifier, a pooler) are logged and skipped; any other tensor left over is an
error.

`abstract_params` is an `nnx.State` of `jax.ShapeDtypeStruct` (with shardings, as
`TrainProgram.target()['params']`, or without them, then laid out by `layout`, else placed on
the first device); it may hold any subset of the model's parameters (e.g. only the frozen
ones): only those are read and returned.

`model_section(path)` returns the `config.model` dict a checkpoint describes, so a fine-tuning
config states no sizes of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.finetune import fit
from jaxformer.interop import hf
from jaxformer.models import build_model
from jaxformer.parallel.sharding import names_of
from jaxformer.parallel.state import abstract_model
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.workdir import to_plain

log = logging.getLogger('jaxformer')

FIELD = 'finetune.init_from'
# HF tensors of heads an experiment may drop (LM / MLM / classification heads, the pooler).
_DROPPABLE = re.compile(hf._HEAD_KEYS.pattern + r'|(^|\.)pooler\.')  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved `finetune.init_from`: kind 'jaxformer' (a run folder, `step` None for its
  newest readable checkpoint) or 'hf' (a directory; `weights` a single safetensors file)."""
  kind: str
  path: str
  step: int | None = None
  weights: str | None = None

  def __str__(self) -> str:
    if self.kind == 'hf':
      return f'Hugging Face checkpoint {self.weights or self.path}'
    return f'jaxformer run {self.path}' + ('' if self.step is None else f' (step {self.step})')


_FORMS = ('a jaxformer run folder (or one of its checkpoints/<step> folders), a Hugging Face '
          'directory (config.json + *.safetensors) or a .safetensors file with config.json '
          'next to it')


def resolve(path: str, field: str = FIELD) -> Source:
  """What `path` is; raises FileNotFoundError / ConfigError saying what was expected."""
  if not path:
    raise ConfigError(f'{field}={path!r} is invalid: give {_FORMS}')
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{field}={path!r} does not exist: give {_FORMS}')
  if os.path.isfile(path):
    if not path.endswith('.safetensors'):
      raise ConfigError(f'{field}={path!r} is invalid: a file must be a .safetensors file '
                        f'(PyTorch pickles are not read); give {_FORMS}')
    folder = os.path.dirname(path)
    if not os.path.isfile(os.path.join(folder, 'config.json')):
      raise FileNotFoundError(f'{field}={path!r}: no config.json next to it in {folder}; save '
                              "the model's config there (config.save_pretrained)")
    return Source('hf', folder, weights=path)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == ckpt_lib.CHECKPOINT_DIR:
    return _run(os.path.dirname(parent), field, int(os.path.basename(path)))
  if os.path.isdir(os.path.join(path, ckpt_lib.CHECKPOINT_DIR)):
    return _run(path, field)
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'{field}={path!r} holds neither config.json nor a checkpoints '
                            f'folder: give {_FORMS}')
  if not any(f.endswith('.safetensors') for f in os.listdir(path)):
    raise FileNotFoundError(
        f'{field}={path!r} has a config.json but no *.safetensors file (PyTorch .bin pickles '
        'are not read: save the model with save_pretrained(..., safe_serialization=True))')
  return Source('hf', path)


def _run(path: str, field: str, step: int | None = None) -> Source:
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'{field}={path!r}: the run folder has no config.json (written '
                            'by python -m jaxformer.train), so its model is unknown')
  return Source('jaxformer', path, step)


def model_section(path: str, field: str = FIELD, **overrides) -> dict[str, Any]:
  """The `config.model` section (a plain dict) of the model a checkpoint holds: an HF
  checkpoint's config converted by `jaxformer.interop.hf`, or a jaxformer run's saved model
  section; `overrides` (nested sections as dicts) are merged over it."""
  src = resolve(path, field)
  cfg = _source_config(src)
  return hf._merge(to_plain(cfg), overrides)  # pylint: disable=protected-access


def _source_config(src: Source) -> ModelConfig:
  if src.kind == 'hf':
    return hf.read_checkpoint(src.path, src.weights).cfg
  with open(os.path.join(src.path, 'config.json')) as f:
    return ModelConfig.from_dict(json.load(f)['model'])


# =========================================================================== loading
def load_initial_params(source: str, model_cfg: ModelConfig, abstract_params: nnx.State,
                        layout=None, *, seed: int = 0, field: str = FIELD
                        ) -> tuple[nnx.State, list[str]]:
  """-> (the parameters of `abstract_params` from `source`, the dotted paths initialised
  fresh). See the module docstring; `seed` is the experiment's (`train.seed`)."""
  src = resolve(source, field)
  where = f'{field}={source!r} ({src})'
  targets = _targets(abstract_params, layout)
  if src.kind == 'hf':
    ck = hf.read_checkpoint(src.path, src.weights)
    source_cfg, rules_cfg = ck.cfg, model_cfg
  else:
    ck = None
    source_cfg = _source_config(src)
  fit.check_fits(source_cfg, model_cfg, where)
  new = _new_paths(model_cfg, source_cfg)
  if ck is not None:
    values = _from_hf(ck, rules_cfg, targets, new, where)
  else:
    values = _from_run(src, targets, new, where)
  fresh = sorted(p for p in targets if p not in values)
  if fresh:
    log.info('%s: %d parameter(s) are not in the checkpoint and keep their fresh '
             'initialisation: %s', where, len(fresh), fresh)
    values.update(_fresh(model_cfg, seed, {p: targets[p] for p in fresh}))
  flat = [(path, var.replace(values['.'.join(map(str, path))]))
          for path, var in nnx.to_flat_state(abstract_params)]
  return nnx.from_flat_state(flat), fresh


@dataclasses.dataclass(frozen=True)
class _Target:
  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  names: tuple[str | None, ...] | None


def _targets(abstract_params: nnx.State, layout) -> dict[str, _Target]:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = {}
  for path, var in nnx.to_flat_state(abstract_params):
    name = '.'.join(map(str, path))
    x = var.get_value()
    sharding = getattr(x, 'sharding', None)
    if sharding is None:
      sharding = layout.variable_sharding(var, f'parameter {name!r}') if layout else device
    out[name] = _Target(tuple(x.shape), x.dtype, sharding, names_of(var))
  return out


def _param_paths(cfg: ModelConfig) -> set[str]:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return {'.'.join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def _new_paths(model_cfg: ModelConfig, source_cfg: ModelConfig) -> set[str]:
  """Parameters of the experiment's model that the checkpoint's model does not have (the
  experiment's model with the checkpoint's heads and without the added PEFT sections), and the
  classifier when the checkpoint's has another number of labels."""
  over = {k: getattr(source_cfg, k) for k in fit.HEAD_FIELDS}
  for name in fit.ADDED_SECTIONS:
    if hasattr(model_cfg, name):
      over[name] = type(getattr(model_cfg, name))()
  ours = _param_paths(model_cfg)
  new = ours - _param_paths(dataclasses.replace(model_cfg, **over))
  if source_cfg.num_labels != model_cfg.num_labels:
    new |= {p for p in ours if p.split('.')[0] == 'classifier'}
  return new


def _canonical_paths(cfg: ModelConfig, paths: set[str]) -> dict[str, str]:
  model = abstract_model(cfg)
  first = {id(v): '.'.join(map(str, p)) for p, v in nnx.iter_graph(model)
           if isinstance(v, nnx.Param)}
  return {p: first[id(hf._resolve(model, p))] for p in paths}  # pylint: disable=protected-access


def _put(x: np.ndarray, t: _Target) -> jax.Array:
  return jax.device_put(np.asarray(x).astype(t.dtype), t.sharding)


def _from_hf(ck: hf.Checkpoint, cfg: ModelConfig, targets: dict[str, _Target], new: set[str],
             where: str) -> dict[str, jax.Array]:
  arrays, used, missing = hf.convert(ck.rules(cfg), ck.sd)
  # A parameter shared by two modules (T5's embedding and the decoder's) is in the state once,
  # under the first path the graph walk meets; the rules may name it by another.
  canonical = _canonical_paths(cfg, set(arrays) | set(missing))
  arrays = {canonical[p]: x for p, x in arrays.items()}
  missing = {canonical[p]: keys for p, keys in missing.items()}
  lacking = sorted(p for p in missing if p not in new)
  if lacking:
    keys = sorted({k for p in lacking for k in missing[p]})
    raise ConfigError(f'{where} lacks the tensor(s) {keys[:12]} of parameter(s) {lacking[:12]}; '
                      'only task heads and PEFT modules may start fresh')
  leftover = hf.unused_keys(ck.sd, used, ck.family.ignore)
  dropped = [k for k in leftover if _DROPPABLE.search(k)]
  unknown = [k for k in leftover if k not in dropped]
  if unknown:
    raise ConfigError(f'{where}: {len(unknown)} tensor(s) have no parameter in the model: '
                      f'{unknown[:12]}')
  if dropped:
    log.info('%s: the model has no head for %d tensor(s), which are skipped: %s', where,
             len(dropped), dropped)
  arrays = {p: x for p, x in arrays.items() if p in targets and p not in new}
  for path, x in arrays.items():
    fit.check_shape(path, x.shape, targets[path].shape, targets[path].names, where)
  unset = [p for p in targets if p not in arrays and p not in new]
  if unset:
    raise AssertionError(f'the {ck.model_type} rules leave parameters unset: {unset[:12]}')
  return {p: _put(x, targets[p]) for p, x in arrays.items()}


def _from_run(src: Source, targets: dict[str, _Target], new: set[str], where: str
              ) -> dict[str, jax.Array]:
  """Reads only the parameters of the newest readable (or the chosen) checkpoint step."""
  ckpt = ckpt_lib.Checkpointer(src.path, read_only=True)
  try:
    steps = [src.step] if src.step is not None else sorted(ckpt.all_steps(), reverse=True)
  finally:
    ckpt.close()
  if not steps:
    raise ckpt_lib.CheckpointError(f'{where}: the run has no checkpoint yet')
  errors = []
  for step in steps:
    try:
      return _restore_params(os.path.join(ckpt.directory, str(step)), targets, new, where)
    except (ConfigError, ckpt_lib.IncompatibleCheckpointError):
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      if src.step is not None:
        raise
      errors.append(f'step {step}: {ckpt_lib._short(e)}')  # pylint: disable=protected-access
      log.warning('%s: checkpoint step %d cannot be read (%s); trying the previous one', where,
                  step, errors[-1])
  raise ckpt_lib.CheckpointError(f'{where}: no checkpoint can be read ({"; ".join(errors)})')


def _dotted(key: tuple) -> str:
  parts = [str(k) for k in key[1:]]  # drop 'params'
  return '.'.join(parts[:-1] if parts and parts[-1] == 'value' else parts)


def _restore_params(step_dir: str, targets: dict[str, _Target], new: set[str], where: str
                    ) -> dict[str, jax.Array]:
  state_dir = os.path.join(step_dir, ckpt_lib.STATE)
  meta = ocp.StandardCheckpointer().metadata(state_dir)
  meta = getattr(meta, 'item_metadata', meta)
  tree = getattr(meta, 'tree', meta)
  params = traverse_util.flatten_dict({'params': dict(tree.get('params', {}))})
  saved = {_dotted(k): (k, leaf) for k, leaf in params.items()}
  lacking = sorted(p for p in targets if p not in saved and p not in new)
  if lacking:
    raise ckpt_lib.IncompatibleCheckpointError(
        f'{where}: the checkpoint lacks parameter(s) {lacking[:12]} (only task heads and PEFT '
        'modules may start fresh). A run fine-tuned with adapters (finetune.method=lora) '
        'keeps only those: export its merged parameters first (python -m '
        'jaxformer.finetune.export --format=jaxformer) and start from the export')
  wanted = {}
  for path, (key, leaf) in saved.items():
    if path in targets and path not in new:
      t = targets[path]
      fit.check_shape(path, leaf.shape, t.shape, t.names, where)
      wanted[key] = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
  dropped = sorted(p for p in saved if p not in targets or p in new)
  if dropped:
    log.info('%s: %d checkpoint parameter(s) are not read: %s', where, len(dropped), dropped)
  item = traverse_util.unflatten_dict(wanted)
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  flat = traverse_util.flatten_dict(restored)
  _verify(step_dir, flat, where)
  return {_dotted(k): flat[k] for k in wanted}


def _verify(step_dir: str, flat: dict[tuple, Any], where: str) -> None:
  """The restored arrays against the checksums the run saved with them."""
  extras = os.path.join(step_dir, ckpt_lib.EXTRAS, 'metadata')
  if not os.path.isfile(extras):
    return
  with open(extras) as f:
    saved = json.load(f).get('checksums') or {}
  named = {'/'.join(str(k) for k in (key[:-1] if key[-1] == 'value' else key)): leaf
           for key, leaf in flat.items()}
  got = ckpt_lib.fingerprints(named)
  bad = [n for n in got if n in saved and saved[n] != got[n]]
  if bad:
    raise ckpt_lib.CorruptCheckpointError(
        f'{where}: {len(bad)} restored array(s) do not match their saved checksums, first '
        f'{bad[0]!r}')


def _fresh(cfg: ModelConfig, seed: int, targets: dict[str, _Target]) -> dict[str, jax.Array]:
  """The values `build_model(cfg, seed=seed)` gives these parameters, made in place (XLA
  drops the initialisers of every other parameter)."""
  paths = sorted(targets)

  def init():
    flat = {'.'.join(map(str, p)): v.get_value() for p, v in
            nnx.to_flat_state(nnx.state(build_model(cfg, seed=seed), nnx.Param))}
    return [flat[p] for p in paths]

  out = jax.jit(init, out_shardings=[targets[p].sharding for p in paths])()
  return {p: x.astype(targets[p].dtype) for p, x in zip(paths, out)}
