"""python -m jaxformer.train --config=configs/x.py[:arg] --workdir=DIR [--config.a.b=v]

Trains (or resumes) the experiment of a config file; see README.md for the config format.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxformer.cli import maybe_initialize_distributed, setup_logging

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                                'Call jax.distributed.initialize() (TPU pods, GPU clusters).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  setup_logging()
  maybe_initialize_distributed(_MULTIHOST.value)
  from jaxformer.train.trainer import train_and_evaluate
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('done at step %d', result['step'])


if __name__ == '__main__':
  app.run(main)
