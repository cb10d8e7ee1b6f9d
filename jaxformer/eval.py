"""python -m jaxformer.eval --workdir=DIR [--split=test] [--batches=-1] [--config=FILE[:arg]]
       [--mesh=fsdp=8,tensor=1] [--multihost | --coordinator_address=... ...]

Evaluates the latest checkpoint of a run on one split and prints the metrics (loss, accuracy,
perplexity and, for byte-level data, bits per byte). The config defaults to the resolved config
the run saved in DIR/config.json; `--mesh` evaluates on another layout or device count (the
checkpoint is read straight into the new shardings).
"""

import json

from absl import flags
from ml_collections import config_flags

from jaxformer.cli import (define_distributed_flags, define_mesh_flags, initialize_distributed,
                           load_run_config, run, setup_logging, with_mesh)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file; default: the run\'s own.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory.', required=True)
_DISTRIBUTED = define_distributed_flags()
_MESH = define_mesh_flags()
_SPLIT = flags.DEFINE_string('split', 'test', 'Split to evaluate.')
_BATCHES = flags.DEFINE_integer('batches', -1,
                                'Number of batches (-1, the default: the whole split).')


def main(argv):
  del argv
  setup_logging()
  initialize_distributed(_DISTRIBUTED)
  from jaxformer.train.trainer import Trainer
  config = with_mesh(load_run_config(_WORKDIR.value, _CONFIG.value), _MESH)
  trainer = Trainer(config, _WORKDIR.value, mode='eval')
  metrics = trainer.evaluate(_SPLIT.value, _BATCHES.value, counts=True)
  trainer.close()
  print(json.dumps({'step': int(trainer.state['step']), 'split': _SPLIT.value, **metrics},
                   indent=1))


if __name__ == '__main__':
  run(main)
