"""The whole experiment config, validated before anything is built or compiled.

A config file (`configs/*.py`) returns an `ml_collections.ConfigDict` with the sections

  model     jaxformer.config.ModelConfig fields (usually `models.family_dict('llama', ...)`)
  data      jaxformer.data.config.DataConfig fields
  optim     jaxformer.train.optimizer.OptimConfig fields
  train     TrainConfig fields below
  parallel  jaxformer.parallel.config.ParallelConfig fields (mesh, preset, rules)
  finetune  jaxformer.finetune.config.FinetuneConfig fields (init_from, method, LoRA, unfreezing)
  compress  jaxformer.compress.config.CompressConfig fields (QAT, pruning, distillation)

`Experiment.from_config` turns it into frozen dataclasses; every error names the dotted field
and the allowed values, and cross-section checks (task vs family, sequence length vs the model's
limit, batch size vs devices) run here, before compilation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxformer.compress.config import CompressConfig
from jaxformer.config import ConfigError, ModelConfig, _build, _to_plain, check_choice, fail
from jaxformer.analysis.adversarial import ATTACKS
from jaxformer.analysis.maps import check_weights
from jaxformer.data.config import DataConfig
from jaxformer.data.curriculum import Curriculum
from jaxformer.finetune.config import FinetuneConfig
from jaxformer.models.stack import layer_period
from jaxformer.parallel import pipeline as pipeline_lib
from jaxformer.parallel.config import ParallelConfig, check_context
from jaxformer.parallel.config import default_section as parallel_section
from jaxformer.train import tasks
from jaxformer.train.optimizer import DECAYING, OptimConfig

log = logging.getLogger('jaxformer')

NONFINITE = ('stop', 'skip')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings. Steps count optimizer updates; one step consumes `batch_size` examples
  (split into `optim.grad_accum_steps` micro-batches). `eval_batches` / `test_batches`: batches
  per evaluation of the validation / test split; 0 skips it, -1 reads the whole split.
  `profile_steps` > 0 writes a jax.profiler trace of that many steps into <workdir>/profile,
  from step `profile_start` (0: two steps after the start, past compilation).
  `compilation_cache`: where compiled programs are kept between starts ('auto', 'none' or a
  directory; jaxformer/compile_cache.py).
  `curriculum`: a sequence-length curriculum, stages (start_step, seq_len[, batch_size]) such
  as ((0, 128), (1000, 512)); without a batch size a stage keeps the tokens per step of
  batch_size x data.seq_len (jaxformer/data/curriculum.py). Empty: every step is batch_size
  rows of data.seq_len.
  `adversarial` ('none', 'fgsm', 'pgd'): adversarial training on the input token embeddings,
  loss (1 - adversarial_weight) clean + adversarial_weight x the loss at the attack's delta
  (L_inf radius `adversarial_eps`; PGD: `adversarial_steps` steps of `adversarial_step_size`,
  0 = 2.5 eps / steps, from a random start unless `adversarial_random_start` is False);
  jaxformer/analysis/adversarial.py. `entropy_metrics`: log the mean attention entropy of every
  layer; `activation_entropy`: the mean entropy of every dense FFN layer's hidden activation
  (jaxformer/analysis/entropy.py); docs/analysis.md."""
  seed: int = 0
  batch_size: int = 16
  steps: int = 1000
  log_every: int = 50
  eval_every: int = 500
  eval_batches: int = 8
  test_batches: int = 0
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  nonfinite: str = 'stop'
  progress: bool = True
  tensorboard: bool = True
  sample_prompt: str = ''
  sample_tokens: int = 0
  sample_temperature: float = 0.0
  sample_top_k: int = 0
  sample_top_p: float = 1.0
  profile_steps: int = 0
  profile_start: int = 0
  compilation_cache: str = 'auto'
  curriculum: tuple[tuple[int, ...], ...] = ()  # lists (config.json) are read as tuples
  adversarial: str = 'none'
  adversarial_eps: float = 0.01
  adversarial_steps: int = 3
  adversarial_step_size: float = 0.0
  adversarial_weight: float = 0.5
  adversarial_random_start: bool = True
  entropy_metrics: bool = False
  activation_entropy: bool = False

  def validate(self) -> None:
    check_choice('train.nonfinite', self.nonfinite, NONFINITE)
    check_choice('train.adversarial', self.adversarial, ATTACKS)
    if self.adversarial != 'none':
      if not self.adversarial_eps > 0:
        fail('train.adversarial_eps', self.adversarial_eps, 'must be > 0 (the L_inf radius)')
      if self.adversarial_steps < 1:
        fail('train.adversarial_steps', self.adversarial_steps, 'must be >= 1')
      if self.adversarial_step_size < 0:
        fail('train.adversarial_step_size', self.adversarial_step_size,
             'must be >= 0 (0: 2.5 eps / steps)')
      if not 0.0 < self.adversarial_weight <= 1.0:
        fail('train.adversarial_weight', self.adversarial_weight, 'must be in (0, 1]')
    for name in ('batch_size', 'steps', 'log_every', 'eval_every', 'checkpoint_every',
                 'keep_checkpoints'):
      if getattr(self, name) <= 0:
        fail(f'train.{name}', getattr(self, name), 'must be a positive integer')
    for name in ('eval_batches', 'test_batches'):
      if getattr(self, name) < -1:
        fail(f'train.{name}', getattr(self, name), 'must be >= 0, or -1 for the whole split')
    for name in ('sample_tokens', 'sample_top_k', 'profile_steps', 'profile_start'):
      if getattr(self, name) < 0:
        fail(f'train.{name}', getattr(self, name), 'must be >= 0')
    if not 0.0 <= self.label_smoothing < 1.0:
      fail('train.label_smoothing', self.label_smoothing, 'must be in [0, 1)')
    if self.z_loss < 0:
      fail('train.z_loss', self.z_loss, 'must be >= 0')
    if not 0.0 < self.sample_top_p <= 1.0:
      fail('train.sample_top_p', self.sample_top_p, 'must be in (0, 1]')


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  train: TrainConfig
  parallel: ParallelConfig
  finetune: FinetuneConfig = FinetuneConfig()
  compress: CompressConfig = CompressConfig()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> 'Experiment':
    d = _to_plain(config)
    allowed = {'model', 'data', 'optim', 'train', 'parallel', 'finetune', 'compress'}
    unknown = sorted(set(d) - allowed)
    if unknown:
      raise ConfigError(f'config: unknown section(s) {unknown}; allowed sections are '
                        f'{sorted(allowed)}')
    for section in ('model', 'data'):
      if section not in d:
        raise ConfigError(f'config.{section} is missing: every config needs a model and a data '
                          'section')
    train = _build(TrainConfig, d.get('train', {}), 'train')
    train.validate()
    parallel = _build(ParallelConfig, d.get('parallel', {}), 'parallel')
    parallel.validate()
    optim = OptimConfig.from_dict(d.get('optim', {}))
    if optim.total_steps is None:
      # The schedule follows the run: overriding train.steps alone stretches it.
      if optim.schedule in DECAYING and train.steps <= optim.warmup_steps:
        fail('train.steps', train.steps,
             f'the {optim.schedule} schedule (as long as the run, optim.total_steps unset) '
             f'needs more steps than optim.warmup_steps={optim.warmup_steps}')
      optim = optim.replace(total_steps=train.steps)
    elif optim.schedule in DECAYING and optim.total_steps < train.steps:
      log.warning(
          'optim.total_steps=%d is shorter than train.steps=%d: the learning rate stays at '
          'its final value (optim.end_lr_ratio=%g of optim.lr) for the last %d steps. Leave '
          'optim.total_steps unset to make the schedule as long as the run.',
          optim.total_steps, train.steps, optim.end_lr_ratio, train.steps - optim.total_steps)
    finetune = _build(FinetuneConfig, d.get('finetune', {}), 'finetune')
    finetune.validate()
    compress = _build(CompressConfig, d.get('compress', {}), 'compress')
    compress.validate()
    exp = cls(model=ModelConfig.from_dict(d['model']), data=DataConfig.from_dict(d['data']),
              optim=optim, train=train, parallel=parallel, finetune=finetune, compress=compress)
    exp.validate()
    return exp

  def validate(self) -> None:
    m, dcfg, t = self.model, self.data, self.train
    tasks.check_task(dcfg.task, m)
    fam = m.family_spec
    if fam.token_inputs and dcfg.seq_len > m.max_length:
      fail('data.seq_len', dcfg.seq_len,
           f'exceeds the model limit model.max_length={m.max_length}')
    if dcfg.target_len is not None and dcfg.target_len > m.max_length:
      fail('data.target_len', dcfg.target_len,
           f'exceeds the model limit model.max_length={m.max_length}')
    prompt = m.peft.prompt_length
    if prompt and fam.token_inputs and dcfg.seq_len + prompt > m.max_length:
      fail('data.seq_len', dcfg.seq_len,
           f'plus the prompt (model.peft.prompt_length={prompt}) exceeds the model limit '
           f'model.max_length={m.max_length}')
    if prompt and dcfg.resolved_packing != 'none':
      fail('data.packing', dcfg.packing,
           f"must be 'none' with model.peft.prompt_length={prompt}: the prompt is put in front "
           'of each row once, so packed examples after the first would not see it (prefix '
           'tuning, model.peft.prefix_length, serves every packed segment)')
    if fam.packing is not None and dcfg.resolved_packing != 'none':
      fail('data.packing', dcfg.packing,
           f"must be 'none' for model.family={m.family!r}: {fam.packing}")
    if dcfg.resolved_packing != 'none' and fam.token_inputs and fam.packing is None:
      from jaxformer.attention import registry  # pylint: disable=import-outside-toplevel
      a = m.attention
      if 'segments' not in registry.lookup(a.kind, a.impl).features:
        fail('data.packing', dcfg.packing,
             f"must be 'none' for model.attention.kind={a.kind!r}: it cannot keep packed "
             'examples apart (it does not support segment ids), so packed rows would leak into '
             "each other; set data.packing='none'")
    self.check_length('data.seq_len', dcfg.seq_len)
    self.check_analysis()
    if t.curriculum:
      self.check_curriculum()
    stages = self.parallel.axis_size('stage')
    if stages > 0:  # -1 ('the rest') is checked once the mesh is known (TrainProgram)
      self.check_pipeline(stages)
    k = self.optim.grad_accum_steps
    for field, batch in self.batch_sizes():
      if batch % k:
        fail(field, batch, f'must be divisible by optim.grad_accum_steps={k}')
    self.compress.check(self)

  def check_analysis(self) -> None:
    """Refuses adversarial training without token embeddings and entropy metrics without
    attention weights (jaxformer/analysis)."""
    m, t = self.model, self.train
    if t.adversarial != 'none' and m.family_spec.input_embedder is None:
      fail('train.adversarial', t.adversarial,
           f"needs token embeddings to perturb; model.family={m.family!r} has none (it reads "
           "images or embeds tokens itself): use 'none'")
    if t.entropy_metrics:
      try:
        check_weights(m)
      except ConfigError as e:
        fail('train.entropy_metrics', True, f'needs the attention probabilities: {e}')
    if t.activation_entropy and m.ffn.chunk_size is not None:
      fail('train.activation_entropy', True, f'cannot read the FFN activations computed in '
           f'chunks (model.ffn.chunk_size={m.ffn.chunk_size}, a loop that keeps no sown values): '
           'use chunk_size None')
    for field in ('entropy_metrics', 'activation_entropy'):
      if not getattr(t, field):
        continue
      for why, on in (('pipeline parallelism (parallel.mesh.stage > 1)',
                       self.parallel.axis_size('stage') > 1),
                      ('reversible layers (model.reversible)', m.reversible)):
        if on:
          fail(f'train.{field}', True, f'cannot read the activations of {why}: the layers run '
               'inside their own transforms, which keep no sown values')

  def check_length(self, field: str, seq_len: int) -> None:
    """Refuses a row length (data.seq_len or a curriculum stage's) the model or the mesh cannot
    split: context-parallel chunks, Transformer-XL segments."""
    m = self.model
    check_context(self.parallel, m.attention.impl,
                  seq_len if m.family_spec.context_parallel else None, field)
    seg = m.segment_length
    if seg and seq_len > seg and seq_len % seg:
      fail(field, seq_len, f'model.segment_length={seg} cuts every row into segments of that '
           'length (Transformer-XL), so a longer row must be a multiple of it')

  def curriculum(self) -> Curriculum:
    """The stages of train.curriculum; without one, a single stage of train.batch_size rows of
    data.seq_len."""
    t, d = self.train, self.data
    if not t.curriculum:
      return Curriculum.constant(d.seq_len, t.batch_size)
    return Curriculum.from_spec(t.curriculum, seq_len=d.seq_len, batch_size=t.batch_size)

  def batch_sizes(self) -> list[tuple[str, int]]:
    """(field, batch size) of train.batch_size (evaluation's batch) and of every curriculum
    stage."""
    out = [('train.batch_size', self.train.batch_size)]
    if self.train.curriculum:
      out += [(f'train.curriculum[{i}] batch_size', s.batch_size)
              for i, s in enumerate(self.curriculum().stages)]
    return out

  def check_curriculum(self) -> None:
    """Refuses a curriculum this experiment cannot follow (see jaxformer/data/curriculum.py)."""
    m, dcfg, t = self.model, self.data, self.train
    if not m.family_spec.token_inputs:
      fail('train.curriculum', t.curriculum,
           f'model.family={m.family!r} does not read token sequences (e.g. it reads images), '
           'so it has no sequence length to schedule')
    if dcfg.worker_count:
      fail('data.worker_count', dcfg.worker_count,
           'must be 0 with train.curriculum: a stage continues the example stream where the '
           "previous one stopped, read from the in-process pipeline's state (grain worker "
           'processes each hold a part of it)')
    stages = self.curriculum().stages
    for i, stage in enumerate(stages):
      self.check_length(f'train.curriculum[{i}] seq_len', stage.seq_len)
    late = [s.start for s in stages if s.start >= t.steps]
    if late:
      log.warning('train.curriculum has stage(s) starting at step(s) %s, at or past '
                  'train.steps=%d: they do not run', late, t.steps)

  def check_pipeline(self, stages: int) -> None:
    """Refuses what pipeline parallelism over `stages` stages cannot run (pipeline.py)."""
    m, par = self.model, self.parallel
    # An unset num_decoder_layers means num_layers (ModelConfig.decoder_layers).
    depth = {'num_layers': m.num_layers, 'num_decoder_layers': m.decoder_layers}
    num_layers = {f'model.{f}': depth[f] for f in m.family_spec.depth_fields}
    if stages > 1 and m.family_spec.pipeline is not None:
      fail('parallel.mesh.stage', stages,
           f'asks for pipeline parallelism, which model.family={m.family!r} cannot use: '
           f'{m.family_spec.pipeline}; set parallel.mesh.stage=1')
    pipeline_lib.check_config(
        stages=stages, repeats=par.pipeline.repeats, microbatches=self.optim.grad_accum_steps,
        num_layers=num_layers, period=layer_period(m), family=m.family,
        own_layers=m.family_spec.own_layers, reversible=m.reversible, scan_layers=m.scan_layers)
    if stages > 1:
      for axis, why in (('context', 'ring attention and gathered K/V'),
                        ('expert', 'the expert all-to-all')):
        if par.axis_size(axis) != 1:
          fail(f'parallel.mesh.{axis}', par.axis_size(axis),
               f'cannot be combined with pipeline parallelism (parallel.mesh.stage={stages}) '
               f'yet: {why} run in shard_map, which the vmapped pipeline stages do not '
               f'support; use one of the two')

  def check_batch(self, batch_shards: int, batch_axes: tuple[str, ...],
                  num_processes: int) -> None:
    """The per-micro-batch examples must split evenly over the batch axes of the mesh and the
    processes that load them, for evaluation's batch and every curriculum stage's."""
    for field, batch in self.batch_sizes():
      micro = batch // self.optim.grad_accum_steps
      if micro % batch_shards:
        fail(field, batch,
             f'gives micro-batches of {micro} examples, which do not split over the '
             f'{batch_shards} devices of the batch mesh axes {batch_axes}; use a multiple of '
             f'{batch_shards * self.optim.grad_accum_steps}')
      if batch % num_processes:
        fail(field, batch, f'must be divisible by the number of processes ({num_processes})')

  def to_dict(self) -> dict[str, Any]:
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(x):
  if dataclasses.is_dataclass(x):
    return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return [_plain(v) for v in x]
  return x


def default_config(*, model: Mapping[str, Any] | None = None,
                   data: Mapping[str, Any] | None = None, optim: Mapping[str, Any] | None = None,
                   train: Mapping[str, Any] | None = None,
                   parallel: Mapping[str, Any] | None = None,
                   finetune: Mapping[str, Any] | None = None,
                   compress: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A ConfigDict with every field of every section filled in (defaults, then the given values).

  Config files start from it so that any field can be overridden from the command line
  (`--config.train.steps=10`), which ConfigDict only allows for keys that exist.
  """
  sections = {
      'model': ModelConfig.from_dict(model or {}),
      'data': DataConfig.from_dict(data or {}),
      'optim': OptimConfig.from_dict(optim or {}),
      'train': _build(TrainConfig, dict(train or {}), 'train'),
      'finetune': _build(FinetuneConfig, dict(finetune or {}), 'finetune'),
      'compress': _build(CompressConfig, dict(compress or {}), 'compress'),
  }
  out = {k: _overridable(v) for k, v in sections.items()}
  out['parallel'] = _parallel_section(parallel)
  return ml_collections.ConfigDict(out)


def _overridable(x):
  """`_plain`, with every None field of a dataclass as a typed placeholder, so that
  `--config.optim.ema_decay=0.999` parses as the field's type (ConfigDict cannot override a
  plain None), and tuples kept as tuples (`--config.train.curriculum='((0, 64), (100, 128))'`
  parses only into a tuple field)."""
  if isinstance(x, tuple):
    return tuple(_overridable(v) for v in x)
  if not dataclasses.is_dataclass(x):
    return _plain(x)
  hints = typing.get_type_hints(type(x))
  out = {}
  for f in dataclasses.fields(x):
    value = getattr(x, f.name)
    if value is None:
      kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      kind = kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, str, bool) else object
      out[f.name] = config_dict.placeholder(kind)
    else:
      out[f.name] = _overridable(value)
  return out


def _parallel_section(given: Mapping[str, Any] | None) -> dict[str, Any]:
  """Every parallel field and rule name present (see `jaxformer.parallel.config`)."""
  section = parallel_section()
  for key, value in dict(given or {}).items():
    if key in ('mesh', 'dcn_mesh', 'rules') and isinstance(value, Mapping):
      base = dict(section[key])
      if key == 'mesh' and -1 in value.values() and 'data' not in value:
        base['data'] = 1  # another axis takes the rest of the devices
      section[key] = dict(base, **_plain(value))
    else:
      section[key] = _plain(value)
  _build(ParallelConfig, section, 'parallel').validate()
  return section


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, imported exactly as `--config=path[:arg]` imports it.

  For notebooks and tests: `load_config('configs/llama.py', 'size=tiny')`.
  """
  # The loader behind the --config flag, so a file behaves the same here and on the CLI.
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  name = os.path.splitext(os.path.basename(path))[0]
  module = config_flags._LoadConfigModule(f'{name}_config', path)  # pylint: disable=protected-access
  return module.get_config(arg) if arg is not None else module.get_config()
