"""python -m jaxformer.compress prune --workdir=RUN --out=OUT [--heads=K] [--neurons=M]
       [--sparsity=S [--scope=global|layer] [--embeddings]] [--config=FILE[:arg]] [--mesh=...]

Prunes the parameters of a run's newest checkpoint and writes them as a plain run folder that
`python -m jaxformer.eval --workdir=OUT` and `python -m jaxformer.generate --workdir=OUT` read
like any run (config.json with the pruned model section, one checkpoint at the run's step with
a fresh optimizer state):

  --heads / --neurons   structured pruning (jaxformer/compress/structured.py): K attention heads
                        and M FFN units fewer in every layer; the shapes shrink
  --sparsity            then one-shot magnitude pruning (jaxformer/compress/prune.py) of that
                        fraction of the eligible matrices' weights; the zeros are stored dense

It prints a JSON report: parameters and bytes before and after (dense float storage) and, with
--sparsity, the sparsity reached and the bytes of a bitmap encoding (one bit per eligible
weight plus its nonzero values; the run folder itself stores the zeros dense).
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxformer.config import ConfigError


def prune_run(trainer, out: str, *, heads: int = 0, neurons: int = 0, sparsity: float = 0.0,
              scope: str = 'global', embeddings: bool = False) -> dict[str, Any]:
  """Prunes `trainer`'s model (see the module docstring), writes `out`; returns the report."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxformer.compress import prune, structured  # pylint: disable=import-outside-toplevel
  from jaxformer.compress.config import PruneConfig  # pylint: disable=import-outside-toplevel
  from jaxformer.finetune.export import plain_config  # pylint: disable=import-outside-toplevel
  if not (heads or neurons or sparsity):
    raise ConfigError('nothing to prune: give --heads, --neurons and/or --sparsity')
  cfg = PruneConfig(method='magnitude', sparsity=sparsity, scope=scope, embeddings=embeddings)
  cfg.validate()
  exp = trainer.exp
  params = jax.device_get(trainer.model_params())
  report: dict[str, Any] = {'step': int(trainer.state['step']), 'out': out,
                            'params_before': _count(params),
                            'bytes_before': structured.num_bytes(params)}
  model_cfg = exp.model
  if heads or neurons:
    choices = structured.choose(model_cfg, params, heads=heads, neurons=neurons)
    model_cfg, params = structured.shrink(model_cfg, params, choices)
    report.update(num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
                  ffn_hidden_dim=model_cfg.ffn_hidden_dim)
  if sparsity:
    params = jax.device_get(prune.prune_once(params, cfg))
    report.update(prune.sparsity_report(params, embeddings))
  report.update(params_after=_count(params), bytes_after=structured.num_bytes(params))
  config = plain_config(exp)
  config['model'] = model_cfg.to_dict()
  # The output is a plain model: no pruning schedule or teacher comes with it.
  config['compress'] = dict(config.get('compress', {}), prune={'method': 'none'},
                            distill={'teacher': ''})
  _write_run(config, params, report['step'], out, str(trainer.workdir), trainer.layout)
  return report


def _count(params) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size for x in jax.tree.leaves(params))


def _write_run(config: dict, params, step: int, out: str, source: str, layout) -> None:
  """A run folder of `config` holding `params` at `step` (fresh optimizer state)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxformer.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaxformer.train.experiment import Experiment  # pylint: disable=import-outside-toplevel
  from jaxformer.train.program import TrainProgram  # pylint: disable=import-outside-toplevel
  from jaxformer.train.workdir import prepare_workdir, save_config  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(out, ckpt_lib.CHECKPOINT_DIR)):
    raise ConfigError(f'--out={out!r} already holds checkpoints: choose a new folder')
  exp = Experiment.from_config(config)
  program = TrainProgram(exp, layout)
  # A fresh state of the smaller model (its optimizer moments start at zero whatever the
  # parameters), holding the pruned parameters at the source's step.
  state = dict(program.init_state(), params=jax.device_put(params, program.param_shardings),
               step=jax.device_put(np.asarray(step, np.int32), layout.replicated))
  folder = prepare_workdir(out)
  save_config(folder, exp.to_dict())
  with ckpt_lib.Checkpointer(folder, async_save=False) as ckpt:
    ckpt.save(step, state, {'step': step, 'pruned_from': source}, force=True)


def main(argv, *, flag_values) -> None:
  del argv
  from jaxformer.cli import on_finished_run  # pylint: disable=import-outside-toplevel
  f = flag_values
  report = on_finished_run(f, lambda trainer: prune_run(
      trainer, f['out'].value, heads=f['heads'].value, neurons=f['neurons'].value,
      sparsity=f['sparsity'].value, scope=f['scope'].value, embeddings=f['embeddings'].value))
  print(json.dumps(report, indent=1))


def define_flags() -> dict[str, Any]:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from jaxformer.cli import define_run_command_flags  # pylint: disable=import-outside-toplevel
  return {
      **define_run_command_flags(),
      'heads': flags.DEFINE_integer('heads', 0, 'Attention heads to remove per layer.'),
      'neurons': flags.DEFINE_integer('neurons', 0, 'FFN hidden units to remove per layer.'),
      'sparsity': flags.DEFINE_float('sparsity', 0.0,
                                     'Fraction of the eligible weights to zero (magnitude).'),
      'scope': flags.DEFINE_enum('scope', 'global', ['global', 'layer'],
                                 'Magnitude ranking over the whole model or per matrix slice.'),
      'embeddings': flags.DEFINE_bool('embeddings', False,
                                      'Also prune the embedding tables (with --sparsity).'),
  }
