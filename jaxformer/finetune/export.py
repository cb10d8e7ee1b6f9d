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

  from jaxformer.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaxformer.train.workdir import prepare_workdir, save_config  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(out, ckpt_lib.CHECKPOINT_DIR)):
    raise ConfigError(f'--out={out!r} already holds checkpoints: choose a new folder')
  program = trainer.program
  step = int(trainer.state['step'])
  opt_state = jax.jit(program.tx.init, out_shardings=program.opt_shardings)(params)
  state = dict(trainer.state, params=params, opt_state=opt_state)
  folder = prepare_workdir(out)
  save_config(folder, plain_config(trainer.exp))
  with ckpt_lib.Checkpointer(folder, async_save=False) as ckpt:
    ckpt.save(step, state, {'step': step, 'exported_from': str(trainer.workdir)}, force=True)
  return out


def main(argv, *, flag_values) -> None:
  del argv
  from jaxformer.cli import (initialize_distributed, load_run_config, setup_logging,  # pylint: disable=import-outside-toplevel
                             with_mesh)
  from jaxformer.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  f = flag_values
  setup_logging()
  initialize_distributed(f['distributed'])
  config = with_mesh(load_run_config(f['workdir'].value, f['config'].value), f['mesh'])
  trainer = Trainer(config, f['workdir'].value, mode='eval')
  try:
    out = export(trainer, f['out'].value, f['format'].value)
  finally:
    trainer.close()
  print(json.dumps({'step': int(trainer.state['step']), 'format': f['format'].value,
                    'out': out}))


def _define_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from jaxformer.cli import define_distributed_flags, define_mesh_flags  # pylint: disable=import-outside-toplevel
  return {
      'config': config_flags.DEFINE_config_file('config', None,
                                                "Config file; default: the run's own."),
      'workdir': flags.DEFINE_string('workdir', None, 'The run directory.', required=True),
      'out': flags.DEFINE_string('out', None, 'The folder to write.', required=True),
      'format': flags.DEFINE_enum('format', 'hf', FORMATS,
                                  'hf: a Hugging Face directory; jaxformer: a run folder.'),
      'distributed': define_distributed_flags(),
      'mesh': define_mesh_flags(),
  }


if __name__ == '__main__':
  import functools

  from jaxformer.cli import run
  run(functools.partial(main, flag_values=_define_flags()))
