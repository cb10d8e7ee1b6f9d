"""A run moves between meshes through its checkpoint (issue 10 acceptance: topology change).

A checkpoint saved under fsdp8 restores under dp2 x tp4 and on a single device with equal
evaluation outputs, and training resumed on the new mesh logs the losses of an uninterrupted
fsdp8 run (1e-5). Through the public command line, with `--config.parallel.*` overrides, the
layouts log the one-device losses (1e-5): dp2 x fsdp2 x tp2, context parallelism (cp4 x dp2 with
ring attention) and expert parallelism (ep4 x dp2, capacity dispatch), and in the slow suite
fsdp4 x tp2 with sequence parallelism, cp2 x dp2 x tp2 with gathered K/V and ep2 x fsdp2 x tp2.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxformer.train.experiment import load_config
from jaxformer.train.metrics import read_metrics
from jaxformer.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = os.path.join(ROOT, 'configs', 'llama.py')

FSDP8 = dict(preset='fsdp', mesh={'data': 1, 'fsdp': 8})
DP2_TP4 = dict(preset='tp', mesh={'data': 2, 'tensor': 4})
ONE = dict(preset='dp', mesh={'data': 1})


def config(steps: int, parallel: dict):
  c = load_config(LLAMA, 'size=tiny')
  c.model.attention.num_heads = 4
  c.model.attention.num_kv_heads = 4  # tp4 needs 4 kv heads
  c.train.steps = c.optim.total_steps = steps
  c.optim.schedule = 'constant'
  c.train.update(batch_size=8, log_every=1, checkpoint_every=2, eval_every=1000, eval_batches=2,
                 test_batches=0, sample_tokens=0, progress=False, async_checkpoint=False)
  for key, value in parallel.items():
    if key == 'mesh':
      c.parallel.mesh.update({a: value.get(a, 1) for a in c.parallel.mesh})
    else:
      c.parallel[key] = value
  return c


def losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in r}


def test_fsdp8_checkpoint_restores_on_other_meshes_and_training_continues(tmp_path):
  moved, straight = str(tmp_path / 'moved'), str(tmp_path / 'straight')
  Trainer(config(8, FSDP8), straight).run()
  Trainer(config(4, FSDP8), moved).run()
  evals = {}
  for name, parallel, devices in [('fsdp8', FSDP8, None), ('dp2_tp4', DP2_TP4, None),
                                  ('one', ONE, jax.devices()[:1])]:
    trainer = Trainer(config(4, parallel), moved, mode='eval', devices=devices)
    assert int(trainer.state['step']) == 4
    leaf = jax.tree.leaves(trainer.state['params'])[0]
    assert len(leaf.sharding.device_set) == (1 if name == 'one' else 8)
    evals[name] = trainer.evaluate('validation', 2)
  for name in ('dp2_tp4', 'one'):
    np.testing.assert_allclose(evals[name]['loss'], evals['fsdp8']['loss'], atol=1e-5, rtol=0)
  # Resume on dp2 x tp4 to step 8: the losses of the run that never moved.
  Trainer(config(8, DP2_TP4), moved).run()
  ref, got = losses(straight), losses(moved)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(5, 9)], [ref[s] for s in range(5, 9)],
                             atol=1e-5, rtol=0)
  with open(os.path.join(moved, 'config.json')) as f:
    assert json.load(f)['parallel']['mesh']['tensor'] == 4


MIXTRAL = os.path.join(ROOT, 'configs', 'mixtral.py')
# The flags every CLI run shares: 6 steps, a loss logged at each; no evaluation, sample or
# intermediate checkpoint (the final one is always written), which only cost time here.
SHORT_RUN = ('--config.train.steps=6', '--config.optim.total_steps=6', '--config.train.log_every=1',
             '--config.train.eval_every=1000', '--config.train.eval_batches=0',
             '--config.train.checkpoint_every=1000', '--config.train.test_batches=0',
             '--config.train.sample_tokens=0', '--config.train.progress=false')
# configs/llama.py:size=tiny with 4 query heads / 2 kv heads, so tensor=2 divides both.
LLAMA_TINY = (f'--config={LLAMA}:size=tiny', '--config.model.attention.num_heads=4',
              '--config.model.attention.num_kv_heads=2')
# configs/mixtral.py:size=tiny (top-2 of 8 experts), 4 / 2 heads as above, with capacity
# dispatch and C = T slots (capacity_factor = E / K): no assignment drops, on any mesh.
MIXTRAL_TINY = (f'--config={MIXTRAL}:size=tiny', '--config.model.attention.num_heads=4',
                '--config.model.attention.num_kv_heads=2', '--config.model.moe.dispatch=capacity',
                '--config.model.moe.capacity_factor=4.0')


def _cli_losses(workdir, devices, *flags):
  """The per-step losses of `python -m jaxformer.train` on `devices` CPU devices; `flags` start
  with the --config file (ml_collections reads it before its overrides)."""
  e = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  e.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
           PYTHONPATH=ROOT + os.pathsep + e.get('PYTHONPATH', ''))
  subprocess.run([sys.executable, '-m', 'jaxformer.train', f'--workdir={workdir}', *flags,
                  *SHORT_RUN], env=e, check=True, capture_output=True)
  return losses(workdir)


@pytest.fixture(scope='module')
def one_device_losses(tmp_path_factory):
  """The one-device CLI losses of each model, run once for all the meshes compared with it."""
  cache = {}

  def get(model):
    if model not in cache:
      cache[model] = _cli_losses(str(tmp_path_factory.mktemp('one')), 1, *model)
    return cache[model]

  return get


@pytest.mark.parametrize('model,overrides', [
    (LLAMA_TINY, ('--config.parallel.mesh.data=2', '--config.parallel.mesh.fsdp=2',
                  '--config.parallel.mesh.tensor=2')),
    pytest.param(LLAMA_TINY, ('--config.parallel.preset=fsdp_tp', '--config.parallel.mesh.data=1',
                              '--config.parallel.mesh.fsdp=4', '--config.parallel.mesh.tensor=2',
                              '--config.parallel.sequence_parallel=true'),
                 marks=pytest.mark.slow),
    # Context parallelism: ring attention over context=4, the one-device run uses plain attention.
    (LLAMA_TINY, ('--config.parallel.mesh.context=4', '--config.parallel.mesh.data=2',
                  '--config.model.attention.impl=ring')),
    pytest.param(LLAMA_TINY, ('--config.parallel.mesh.context=2', '--config.parallel.mesh.data=2',
                              '--config.parallel.mesh.tensor=2',
                              '--config.model.attention.impl=context_allgather'),
                 marks=pytest.mark.slow),
    # Expert parallelism: the experts split over expert=4 with all-to-all.
    # (slow: in-process, ep4 x dp2 and ep2 x fsdp2 x tp2 steps equal one device by default)
    pytest.param(MIXTRAL_TINY, ('--config.parallel.mesh.expert=4', '--config.parallel.mesh.data=2'),
                 marks=pytest.mark.slow),
    pytest.param(MIXTRAL_TINY, ('--config.parallel.preset=fsdp_tp', '--config.parallel.mesh.data=1',
                                '--config.parallel.mesh.expert=2', '--config.parallel.mesh.fsdp=2',
                                '--config.parallel.mesh.tensor=2'), marks=pytest.mark.slow),
], ids=['dp2_fsdp2_tp2', 'fsdp4_tp2_sp', 'cp4_dp2_ring', 'cp2_dp2_tp2_allgather', 'ep4_dp2',
        'ep2_fsdp2_tp2'])
def test_the_train_command_logs_the_one_device_losses_on_a_mesh(tmp_path, one_device_losses,
                                                                 model, overrides):
  one = one_device_losses(model)
  mesh = _cli_losses(str(tmp_path / 'mesh'), 8, *model, *overrides)
  with open(os.path.join(tmp_path, 'mesh', 'config.json')) as f:  # the overrides took effect
    recorded = json.load(f)
  for flag in overrides:
    *path, value = flag.removeprefix('--config.').replace('=', '.').split('.')
    node = recorded
    for key in path:
      node = node[key]
    assert str(node).lower() == value, (flag, node)
  assert sorted(mesh) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([mesh[s] for s in one], list(one.values()), atol=1e-5, rtol=0)
