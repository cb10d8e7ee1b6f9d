"""Context parallelism end to end: a LLaMA-style model with its sequence split over 'context'.

One training step (GQA, packed rows with positions reset per segment, residual dropout) on
context x data meshes of the 8 simulated devices gives the one-device loss and updated
parameters (fp32, atol 1e-5), with ring attention and with all-gathered K/V. Config checks:
context > 1 needs a context-parallel attention impl and a sequence length its chunks divide.
"""

import numpy as np
import pytest
from parallel_helpers import (LINEAR_OPTIM, LLAMA, ONE_DEVICE, experiment, lm_batches,
                              max_abs_diff, one_device, program, train)

from jaxformer.config import ConfigError
from jaxformer.parallel import rules as R


def llama(impl):
  return dict(LLAMA, attention=dict(LLAMA['attention'], impl=impl))


@pytest.fixture(scope='module')
def reference():
  return train(program(experiment('llama', LLAMA, parallel=ONE_DEVICE, optim=LINEAR_OPTIM),
                       one_device()), lm_batches(1))


@pytest.mark.parametrize('impl, mesh', [
    ('ring', {'context': 4, 'data': 2}),
    pytest.param('ring', {'context': 2, 'data': 4}, marks=pytest.mark.slow),
    pytest.param('context_allgather', {'context': 4, 'data': 2}, marks=pytest.mark.slow),
])
def test_one_step_equals_one_device(impl, mesh, reference):
  ref_losses, ref_params = reference
  prog = program(experiment('llama', llama(impl), parallel=dict(preset='dp', mesh=mesh),
                            optim=LINEAR_OPTIM))
  assert prog.layout.spec(R.QUERIES)[1] == 'context'
  losses, params = train(prog, lm_batches(1))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert max_abs_diff(params, ref_params) < 1e-5


@pytest.mark.parametrize('position', [
    dict(kind='alibi'),
    pytest.param(dict(kind='t5', num_buckets=8, max_distance=16), marks=pytest.mark.slow)])
def test_position_biases_see_global_positions_on_the_ring(position):
  """A decoder with an ALiBi (or a learned T5) position bias instead of RoPE: one step on
  cp4 x dp2 with ring attention gives the one-device loss and parameters (the T5 table's
  gradient included), packed rows with positions reset per segment."""
  model = dict(LLAMA, position=position)
  ref_losses, ref_params = train(program(experiment('llama', model, parallel=ONE_DEVICE,
                                                    optim=LINEAR_OPTIM), one_device()),
                                 lm_batches(1))
  prog = program(experiment('llama', dict(model, attention=dict(LLAMA['attention'], impl='ring')),
                            parallel=dict(preset='dp', mesh={'context': 4, 'data': 2}),
                            optim=LINEAR_OPTIM))
  losses, params = train(prog, lm_batches(1))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert max_abs_diff(params, ref_params) < 1e-5


def test_context_needs_a_context_parallel_impl():
  with pytest.raises(ConfigError, match=r"model.attention.impl='xla'.*'ring'"):
    experiment('llama', LLAMA, parallel=dict(preset='dp', mesh={'context': 4, 'data': 2}))


def test_context_needs_a_divisible_length():
  with pytest.raises(ConfigError, match='data.seq_len=12.*multiple of 8'):
    experiment('llama', llama('ring'), seq_len=12,
               parallel=dict(preset='dp', mesh={'context': 4, 'data': 2}))
  experiment('llama', llama('context_allgather'), seq_len=12,
             parallel=dict(preset='dp', mesh={'context': 4, 'data': 2}))


def test_context_maps_the_activation_lengths():
  table = R.preset_rules('fsdp_tp', sequence_parallel=True, context_parallel=True)
  assert table[R.LENGTH] == ('context',)
  assert table[R.NORM_LENGTH] == ('context', 'tensor')
  assert R.preset_rules('dp')[R.LENGTH] == ()
