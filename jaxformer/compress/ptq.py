"""python -m jaxformer.compress quantize --workdir=RUN --out=OUT [--bits=8|4]
       [--granularity=tensor|channel|group] [--group_size=128] [--nosymmetric]
       [--calibration=minmax|percentile] [--percentile=99.9] [--embeddings]
       [--config=FILE[:arg]] [--mesh=...]

Post-training weight quantization of a finished run (docs/compression.md). Writes a run folder
OUT: config.json (the run's model, fine-tuning and QAT switched off), one checkpoint at the run's step
holding the quantized parameters in their stored form (`quant.quantize_params`: int8 codes, or
int4 codes two to a byte, with their scales and zero points, and the float parameters the
scheme leaves alone) and no optimizer state, and `quantization.json` (the scheme, the source
run and the sizes in bytes, also printed). `python -m jaxformer.eval --workdir=OUT` and
`jaxformer.generate` read OUT like any run: `Trainer(mode='eval')` sees quantization.json,
restores the codes into their shardings and dequantizes them once, so evaluation and sampling
compute in the model's float dtype with the quantized values (weight-only quantization;
activations are not quantized). OUT cannot be trained further.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.compress import quant
from jaxformer.compress.config import QuantScheme
from jaxformer.config import ConfigError
from jaxformer.finetune import lora

RECORD = 'quantization.json'


def read_record(workdir) -> dict[str, Any] | None:
  """The record of a post-training-quantized run folder; None for any other run."""
  from jaxformer.train.workdir import as_path  # pylint: disable=import-outside-toplevel
  path = as_path(workdir) / RECORD
  return json.loads(path.read_text()) if path.exists() else None


def refuse_training(workdir) -> None:
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


def quantize_run(trainer, out: str, scheme: QuantScheme) -> dict[str, Any]:
  """Writes OUT (module docstring) from `trainer` (a Trainer in mode 'eval'); returns the
  record written to OUT/quantization.json."""
  from jaxformer.finetune.export import plain_config, write_run  # pylint: disable=import-outside-toplevel
  from jaxformer.train.workdir import as_path, write_text  # pylint: disable=import-outside-toplevel
  scheme.validate('--')
  program = trainer.program
  chosen, _, shardings = _stored_layout(program, scheme)
  # The raw weights of a QAT run (not its fake-quantized ones): quantized with the QAT scheme
  # they give exactly the values its forward pass used.
  params = jax.jit(functools.partial(program.plan.view_params, fake_quant=False),
                   out_shardings=program.model_param_shardings)(program.model_view(trainer.state))
  stored = jax.jit(lambda p: quant.quantize_params(p, chosen, scheme),
                   out_shardings=shardings)(params)
  step = int(trainer.state['step'])
  record = {'scheme': dataclasses.asdict(scheme), 'source': str(trainer.workdir), 'step': step,
            'quantized': sorted(chosen), 'size': quant.size_report(stored, params, chosen)}
  config = plain_config(trainer.exp)
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
  record = on_finished_run(f, lambda trainer: quantize_run(trainer, f['out'].value, scheme))
  print(json.dumps({'out': f['out'].value, **record}, indent=1))


def define_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from jaxformer.cli import define_run_command_flags  # pylint: disable=import-outside-toplevel
  d = QuantScheme()
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
  }
