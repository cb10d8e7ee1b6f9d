"""Every shipped config: documented, validated, and trained for 2 steps on its tiny preset."""

import glob
import math
import os

import pytest
# The loader the --config flag itself uses, so configs are imported exactly as on the CLI.
from ml_collections.config_flags import config_flags as cf

from jaxformer.train.experiment import Experiment
from jaxformer.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path, arg):
  module = cf._LoadConfigModule(f'{os.path.basename(path)}_config', path)  # pylint: disable=protected-access
  return module, module.get_config(arg)


def test_every_config_is_collected():
  assert len(CONFIGS) >= 12


@pytest.mark.parametrize('path', CONFIGS, ids=[os.path.basename(p)[:-3] for p in CONFIGS])
def test_config_builds_and_trains_two_steps(path, tmp_path):
  module, config = load(path, 'size=tiny')
  assert module.__doc__ and 'python -m jaxformer.train' in module.__doc__, path
  Experiment.from_config(config)
  config.train.steps = 2
  config.train.batch_size = 8
  config.train.eval_batches = 1
  config.train.test_batches = 0
  config.train.sample_tokens = 0
  config.train.progress = False
  config.train.async_checkpoint = False
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.eval_every = 2
  if config.optim.total_steps is not None:
    config.optim.total_steps = 2
    config.optim.warmup_steps = min(config.optim.warmup_steps, 1)
  result = Trainer(config, str(tmp_path)).run()
  assert result['step'] == 2
  assert math.isfinite(result['last_train']['loss'])
  assert math.isfinite(result['eval']['loss'])
  assert os.path.isdir(tmp_path / 'checkpoints' / '2')
