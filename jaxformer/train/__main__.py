"""python -m jaxformer.train --config=configs/x.py[:arg] --workdir=DIR [--config.a.b=v]
       [--multihost | --coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Trains (or resumes) the experiment of a config file; see README.md for the config format and
docs/parallelism.md for meshes and multi-host runs.
"""

from absl import flags, logging
from ml_collections import config_flags

from jaxformer.cli import define_distributed_flags, initialize_distributed, run, setup_logging

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_DISTRIBUTED = define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  setup_logging()
  initialize_distributed(_DISTRIBUTED)
  from jaxformer.train.trainer import train_and_evaluate
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('done at step %d', result['step'])


if __name__ == '__main__':
  run(main)
