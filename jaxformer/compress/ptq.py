"""python -m jaxformer.compress quantize --workdir=RUN --out=OUT [--bits=8|4]
       [--granularity=tensor|channel|group] [--group_size=128] [--nosymmetric]
       [--calibration=minmax|percentile] [--percentile=99.9] [--embeddings]
       [--activations [--noact_symmetric] [--act_calibration=minmax|percentile]
        [--act_percentile=99.99] [--calibration_split=SPLIT] [--calibration_batches=8]]
       [--config=FILE[:arg]] [--mesh=...]

Post-training weight quantization of a finished run (docs/compression.md). Writes a run folder
OUT: config.json (the run's model, fine-tuning and QAT switched off), one checkpoint at the run's step
holding the quantized parameters in their stored form (`quant.quantize_params`: int8 codes, or
int4 codes two to a byte, with their scales and zero points, and the float parameters the
scheme leaves alone) and no optimizer state, and `quantization.json` (the scheme, the source
run and the sizes in bytes, also printed). `python -m jaxformer.eval --workdir=OUT` and
`jaxformer.generate` read OUT like any run: `Trainer(mode='eval')` sees quantization.json,
restores the codes into their shardings and dequantizes them once, so evaluation and sampling
compute in the model's float dtype with the quantized values. OUT cannot be trained further.

With --activations the inputs of the model's matrices are quantized too (W8A8-style static
activation quantization, jaxformer/layers/act_quant.py): one int8 range per matrix input and
layer, calibrated on --calibration_batches batches of --calibration_split by min/max or a
percentile, with the weights already quantized; OUT's config sets model.act_quant and its
checkpoint holds the ranges, so evaluation and sampling fake-quantize every covered activation
(the MoE experts' inputs, the router and the Mamba dt projection stay float).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.compress import quant
from jaxformer.compress.config import CALIBRATIONS, QuantScheme
from jaxformer.config import ConfigError, check_choice, fail
from jaxformer.finetune import lora
from jaxformer.layers import act_quant

RECORD = 'quantization.json'


def read_record(workdir) -> dict[str, Any] | None:
  """The record of a post-training-quantized run folder; None for any other run."""
  from jaxformer.train.workdir import as_path  # pylint: disable=import-outside-toplevel
  path = as_path(workdir) / RECORD
  return json.loads(path.read_text()) if path.exists() else None


def refuse_training(workdir, model_cfg) -> None:
  if model_cfg.act_quant.bits:
    raise ConfigError(
        f'model.act_quant.bits={model_cfg.act_quant.bits} is invalid for training: calibrated '
        'activation quantization is post-training only (python -m jaxformer.compress quantize '
        '--activations on a finished run); use 0')
  if read_record(workdir) is not None:
    raise ConfigError(
        f'{workdir} holds a post-training-quantized model ({RECORD}): evaluate it or sample '
        'from it (python -m jaxformer.eval / jaxformer.generate); train the float run instead '
        '(compress.qat trains with quantization in the loop)')


def _stored_layout(program, scheme: QuantScheme):
  """(chosen parameters, abstract stored tree, its shardings) for the model of `program`."""
  templates = program.abstract_model_params
  chosen = quant.targets(lora.flat_params(templates), scheme, '--')
  abstract = jax.eval_shape(lambda p: quant.quantize_params(p, chosen, scheme), templates)
  return chosen, abstract, program.layout.state_shardings(abstract)


@dataclasses.dataclass(frozen=True)
class ActScheme:
  """Static int8 activation quantization (jaxformer/layers/act_quant.py): one range per
  matrix input and layer, calibrated on `batches` batches of `split` ('' = the run's training
  split) by 'minmax' (the widest range seen) or 'percentile' (the mean over batches of the
  (100 - p, p)-th percentiles, or of the p-th of |x| when symmetric)."""
  symmetric: bool = True
  calibration: str = 'minmax'
  percentile: float = 99.99
  split: str = ''
  batches: int = 8

  def validate(self) -> None:
    check_choice('--act_calibration', self.calibration, CALIBRATIONS)
    if self.calibration == 'percentile' and not 0 < self.percentile <= 100:
      fail('--act_percentile', self.percentile, 'a percentile lies in (0, 100]')
    if self.batches < 1:
      fail('--calibration_batches', self.batches, 'calibration reads at least one batch')


def calibrate(trainer, params: nnx.State, acts: ActScheme) -> tuple[nnx.State, dict[str, Any]]:
  """(ranges, report): the ActRange parameters of the model with activation quantization,
  calibrated per `acts` on the model with parameters `params` (the quantized weights
  dequantized), laid out on the trainer's mesh; and the report for quantization.json."""
  from jaxformer.parallel import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxformer.train import tasks  # pylint: disable=import-outside-toplevel
  from jaxformer.train.step import with_dropout_key  # pylint: disable=import-outside-toplevel
  exp, program, layout = trainer.exp, trainer.program, trainer.layout
  if layout.pipeline is not None:
    raise ConfigError('--activations calibrates on a layout without pipeline stages: pass a '
                      "--mesh without a 'stage' axis (e.g. --mesh=data:-1)")
  cfg = exp.model.replace(act_quant=dataclasses.replace(
      exp.model.act_quant, bits=8, symmetric=acts.symmetric))
  graphdef, abstract, _ = nnx.split(state_lib.abstract_model(cfg, exp.train.seed), nnx.Param, ...)
  sites = sorted(act_quant.ranges(abstract))
  if not sites:
    raise ConfigError(f'model.family={cfg.family!r} has no matrix input that activation '
                      'quantization covers (jaxformer/layers/act_quant.py): drop --activations')
  shardings = layout.state_shardings(abstract)

  def full(p):  # the model's parameters with NaN (uncalibrated) ranges
    fp = lora.flat_params(p)
    return nnx.from_flat_state(
        [(path, v.replace(jnp.full(v.get_value().shape, jnp.nan, jnp.float32))
          if isinstance(v, act_quant.ActRange) else fp[lora.path_key(path)])
         for path, v in nnx.to_flat_state(abstract)])

  with_ranges = jax.jit(full, out_shardings=shardings)(params)
  observe_how = (acts.calibration, acts.percentile, acts.symmetric)

  def observe(p, rest, batch):
    model = nnx.merge(graphdef, p, with_dropout_key(rest, jax.random.key(0)))
    with act_quant.observing(*observe_how):
      tasks.compute_loss(model, exp.data.task, batch, cfg, tasks.LossConfig(),
                         deterministic=True)
    return act_quant.ranges(model)

  step = jax.jit(layout.wrap(observe), in_shardings=(shardings, program.rest_shardings,
                                                     program.batch_sharding),
                 out_shardings=layout.replicated)
  split = acts.split or exp.data.train_split
  it = trainer.split_pipeline(split)
  seen = []
  for batch in it:
    seen.append(step(with_ranges, program.rest, trainer.device_batch(batch)))
    if len(seen) == acts.batches:
      break
  it.close()
  if not seen:
    raise ConfigError(f'--calibration_split={split!r} holds no batch of {exp.train.batch_size} '
                      'rows: choose another split')
  calibrated = act_quant.combine(seen, acts.calibration)
  missing = [k for k, v in calibrated.items() if bool(jnp.isnan(v).any())]
  if missing:
    raise ConfigError(f'activation quantization: no calibration batch reached {missing}')

  abstract_ranges, _ = nnx.split_state(abstract, act_quant.ActRange, ...)
  ranges = nnx.from_flat_state([(path, v.replace(calibrated[lora.path_key(path)]))
                                for path, v in nnx.to_flat_state(abstract_ranges)])
  report = {'bits': 8, **dataclasses.asdict(acts), 'split': split, 'batches': len(seen),
            'sites': len(sites),
            'ranges': {k: jax.device_get(v).round(5).tolist() for k, v in calibrated.items()}}
  placed = jax.jit(lambda r: r, out_shardings=layout.state_shardings(abstract_ranges))(ranges)
  return placed, report


def quantize_run(trainer, out: str, scheme: QuantScheme, acts: ActScheme | None = None
                 ) -> dict[str, Any]:
  """Writes OUT (module docstring) from `trainer` (a Trainer in mode 'eval'); returns the
  record written to OUT/quantization.json. With `acts`, also calibrates static activation
  ranges (`calibrate`) on the model with quantized weights and stores them with it."""
  from jaxformer.finetune.export import plain_config, write_run  # pylint: disable=import-outside-toplevel
  from jaxformer.train.workdir import as_path, write_text  # pylint: disable=import-outside-toplevel
  scheme.validate('--')
  if acts is not None:
    acts.validate()
  program = trainer.program
  chosen, _, shardings = _stored_layout(program, scheme)
  # The raw weights of a QAT run (not its fake-quantized ones): quantized with the QAT scheme
  # they give exactly the values its forward pass used.
  params = jax.jit(functools.partial(program.plan.view_params, fake_quant=False),
                   out_shardings=program.model_param_shardings)(program.model_view(trainer.state))
  config = plain_config(trainer.exp)
  record = {'scheme': dataclasses.asdict(scheme), 'source': str(trainer.workdir)}
  stored = jax.jit(lambda p: quant.quantize_params(p, chosen, scheme),
                   out_shardings=shardings)(params)
  if acts is not None:
    # Ranges of the activations the quantized model computes: calibrated with its weights,
    # then stored beside the codes (parameters the weight scheme leaves alone).
    templates = program.abstract_model_params
    dequantized = jax.jit(lambda s: quant.dequantize_params(s, templates, chosen, scheme),
                          out_shardings=program.model_param_shardings)(stored)
    ranges, record['activations'] = calibrate(trainer, dequantized, acts)
    del dequantized
    stored = nnx.from_flat_state(list(nnx.to_flat_state(stored)) + list(nnx.to_flat_state(ranges)))
    config['model'] = dict(config['model'], act_quant={'bits': 8, 'symmetric': acts.symmetric})
  step = int(trainer.state['step'])
  record.update(step=step, quantized=sorted(chosen),
                size=quant.size_report(stored, params, chosen))
  # The stored weights are quantized already: a QAT run's fake quantization is off in OUT.
  config['compress'] = dict(config['compress'], qat=dict(config['compress']['qat'], bits=0))
  write_run(out, config, step, {'params': stored, 'step': trainer.state['step']},
            {'step': step, 'quantized_from': str(trainer.workdir)})
  write_text(as_path(out) / RECORD, json.dumps(record, indent=1))
  return record


def restore(ckpt, program, record: dict[str, Any]) -> dict[str, Any]:
  """{'params': the model's parameters dequantized into their shardings, 'step'} from the
  newest checkpoint of a quantized run folder (`ckpt`, a Checkpointer)."""
  from jaxformer.parallel import state as state_lib  # pylint: disable=import-outside-toplevel
  scheme = QuantScheme(**record['scheme'])
  chosen, abstract, shardings = _stored_layout(program, scheme)
  step_sds = jax.ShapeDtypeStruct((), jnp.int32)
  target = state_lib.abstract_with({'params': abstract, 'step': step_sds},
                                   {'params': shardings, 'step': program.layout.replicated})
  restored = ckpt.restore(target, read_only=True)
  if restored is None:
    raise ConfigError(f'{ckpt.directory} holds no checkpoint of the quantized model')
  _, state, _ = restored
  templates = program.abstract_model_params
  params = jax.jit(lambda s: quant.dequantize_params(s, templates, chosen, scheme),
                   out_shardings=program.model_param_shardings)(state['params'])
  return {'params': params, 'step': state['step']}


def main(argv, *, flag_values) -> None:
  del argv
  from jaxformer.cli import on_finished_run  # pylint: disable=import-outside-toplevel
  f = flag_values
  scheme = QuantScheme(**{k: f[k].value for k in
                          ('bits', 'granularity', 'group_size', 'symmetric', 'calibration',
                           'percentile', 'embeddings')})
  scheme.validate('--')
  acts = None
  if f['activations'].value:
    acts = ActScheme(symmetric=f['act_symmetric'].value, calibration=f['act_calibration'].value,
                     percentile=f['act_percentile'].value, split=f['calibration_split'].value,
                     batches=f['calibration_batches'].value)
    acts.validate()
  record = on_finished_run(f, lambda trainer: quantize_run(trainer, f['out'].value, scheme,
                                                           acts))
  print(json.dumps({'out': f['out'].value, **record}, indent=1))


def define_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from jaxformer.cli import define_run_command_flags  # pylint: disable=import-outside-toplevel
  d, a = QuantScheme(), ActScheme()
  return {
      **define_run_command_flags('The run to quantize.'),
      'bits': flags.DEFINE_integer('bits', d.bits, 'Bits per code: 8 or 4.'),
      'granularity': flags.DEFINE_string(
          'granularity', d.granularity, 'One scale per tensor (per stacked layer), per output '
          'channel, or per output channel and group of --group_size inputs.'),
      'group_size': flags.DEFINE_integer('group_size', d.group_size,
                                         'Inputs per scale with --granularity=group.'),
      'symmetric': flags.DEFINE_bool('symmetric', d.symmetric,
                                     'Symmetric codes (absmax); --nosymmetric: a zero point.'),
      'calibration': flags.DEFINE_string('calibration', d.calibration,
                                         'minmax or percentile (values beyond are clipped).'),
      'percentile': flags.DEFINE_float('percentile', d.percentile,
                                       'The percentile with --calibration=percentile.'),
      'embeddings': flags.DEFINE_bool('embeddings', d.embeddings,
                                      'Also quantize embedding tables (one scale per row).'),
      'activations': flags.DEFINE_bool(
          'activations', False, 'Also quantize the inputs of the matrices to int8 (one static '
          'scale per tensor and layer, calibrated on --calibration_split).'),
      'act_symmetric': flags.DEFINE_bool('act_symmetric', a.symmetric,
                                         'Symmetric activation codes; --noact_symmetric: a '
                                         'zero point.'),
      'act_calibration': flags.DEFINE_string(
          'act_calibration', a.calibration, 'minmax (the widest range seen) or percentile (the '
          'mean over batches of the --act_percentile range).'),
      'act_percentile': flags.DEFINE_float('act_percentile', a.percentile,
                                           'The percentile with --act_calibration=percentile.'),
      'calibration_split': flags.DEFINE_string(
          'calibration_split', a.split, "The split the activation ranges come from ('': the "
          "run's training split)."),
      'calibration_batches': flags.DEFINE_integer('calibration_batches', a.batches,
                                                  'Batches of --calibration_split to read.'),
  }
