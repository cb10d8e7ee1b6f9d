"""python -m jaxformer.finetune.export --workdir=RUN --out=DIR [--format=hf|jaxformer]
       [--config=FILE[:arg]] [--mesh=...]

Writes the parameters of a run's newest checkpoint (with adapter deltas merged into the base
weights, see `merged_params`) as
  * `hf`: a Hugging Face directory (config.json + model.safetensors) through
    `jaxformer.interop.hf.save_hf_safetensors`, loadable with
    `transformers.AutoModelForCausalLM.from_pretrained(DIR)`: decoders (GPT-2, LLaMA, Mistral,
    Mixtral) and Mamba, the models HF export supports;
  * `jaxformer`: a plain run folder (config.json without fine-tuning settings, and one
    checkpoint of the merged parameters with a fresh optimizer state at the run's step) that
    `python -m jaxformer.eval` / `jaxformer.generate` read like any run, and that
    `finetune.init_from` accepts on its own.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxformer.config import ConfigError

FORMATS = ('hf', 'jaxformer')


def merged_params(trainer) -> Any:
  """The model's full parameters: LoRA updates folded into their base weights, a quantized
  QLoRA base dequantized, frozen and trained parameters together (`Trainer.model_params`)."""
  return trainer.model_params()


def plain_config(exp) -> dict[str, Any]:
  """The run's resolved config with fine-tuning switched off (the export is self-contained)."""
  d = exp.to_dict()
  if 'finetune' in d:
    d['finetune'] = dict(d['finetune'], method='full', init_from='')
  return d


def export(trainer, out: str, fmt: str = 'hf') -> str:
  """Writes `merged_params(trainer)` to `out` in format `fmt`; returns `out`."""
  if fmt not in FORMATS:
    raise ConfigError(f'--format={fmt!r} is invalid: allowed values are {list(FORMATS)}')
  exp = trainer.exp
  if exp.model.act_quant.bits:
    raise ConfigError(
        f'{trainer.workdir} quantizes activations with calibrated ranges (model.act_quant), '
        'which neither a Hugging Face model nor a trainable run can hold: export the float run '
        '(or a weight-only quantized one)')
  params = merged_params(trainer)
  if fmt == 'hf':
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from jaxformer.interop.hf import save_hf_safetensors, to_hf_config  # pylint: disable=import-outside-toplevel
    to_hf_config(exp.model)  # refuses what HF cannot express before anything is written
    model = nnx.merge(trainer.graphdef, params, trainer.rest)
    save_hf_safetensors(model, exp.model, out)
    return out
  return _export_run(trainer, params, out)


def _export_run(trainer, params, out: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  program = trainer.program
  step = int(trainer.state['step'])
  opt_state = jax.jit(program.tx.init, out_shardings=program.opt_shardings)(params)
  state = dict(trainer.state, params=params, opt_state=opt_state)
  return write_run(out, plain_config(trainer.exp), step, state,
                   {'step': step, 'exported_from': str(trainer.workdir)})


def write_run(out: str, config: dict[str, Any], step: int, state, extras) -> str:
  """A run folder `out`: config.json and one checkpoint of `state` at `step` (refuses a folder
  that already holds checkpoints). Also writes post-training-quantized runs
  (jaxformer.compress.ptq)."""
  from jaxformer.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaxformer.train.workdir import prepare_workdir, save_config  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(out, ckpt_lib.CHECKPOINT_DIR)):
    raise ConfigError(f'--out={out!r} already holds checkpoints: choose a new folder')
  folder = prepare_workdir(out)
  save_config(folder, config)
  with ckpt_lib.Checkpointer(folder, async_save=False) as ckpt:
    ckpt.save(step, state, extras, force=True)
  return out


def main(argv, *, flag_values) -> None:
  del argv
  from jaxformer.cli import on_finished_run  # pylint: disable=import-outside-toplevel
  f = flag_values
  out, step = on_finished_run(
      f, lambda trainer: (export(trainer, f['out'].value, f['format'].value),
                          int(trainer.state['step'])))
  print(json.dumps({'step': step, 'format': f['format'].value, 'out': out}))


def _define_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from jaxformer.cli import define_run_command_flags  # pylint: disable=import-outside-toplevel
  return {**define_run_command_flags(),
          'format': flags.DEFINE_enum('format', 'hf', FORMATS,
                                      'hf: a Hugging Face directory; jaxformer: a run folder.')}

if __name__ == '__main__':
  import functools

  from jaxformer.cli import run
  run(functools.partial(main, flag_values=_define_flags()))
