"""python -m jaxformer.eval --workdir=DIR [--split=test] [--batches=N] [--config=FILE[:arg]]

Evaluates the latest checkpoint of a run on one split and prints the metrics (loss, accuracy,
perplexity and, for byte-level data, bits per byte). The config defaults to the resolved config
the run saved in DIR/config.json.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from jaxformer.cli import load_run_config, setup_logging

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file; default: the run\'s own.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory.', required=True)
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to evaluate.')
_BATCHES = flags.DEFINE_integer('batches', 32,
                                'Number of batches (<= one pass; -1: the whole split).')


def main(argv):
  del argv
  setup_logging()
  from jaxformer.train.trainer import Trainer
  trainer = Trainer(load_run_config(_WORKDIR.value, _CONFIG.value), _WORKDIR.value)
  if trainer.ckpt.latest_step() is None:
    raise SystemExit(f'no checkpoint in {trainer.ckpt.directory}: nothing to evaluate')
  metrics = trainer.evaluate(_SPLIT.value, _BATCHES.value)
  print(json.dumps({'step': int(trainer.state['step']), 'split': _SPLIT.value, **metrics},
                   indent=1))


if __name__ == '__main__':
  app.run(main)
