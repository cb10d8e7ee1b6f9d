"""Every layout is proven equal to one device (issue 10 acceptance: equivalence).

One training step of a small LLaMA-style model (GQA, packed rows, residual dropout, clipping,
weight decay) gives the same loss and the same updated parameters on dp8, fsdp8, tp8,
dp2 x fsdp2 x tp2 and fsdp4 x tp2 with sequence parallelism as on one device (fp32, atol 1e-5),
and 20 AdamW steps track the one-device loss curve (<= 1e-4 per step). T5-style
encoder-decoder, BERT and a Mixtral-style MoE decoder do the same under dp2 x fsdp2 x tp2.
Parameters are compared after an optimizer linear in the gradient (see parallel_helpers.OPTIM).
"""

import numpy as np
import pytest
from parallel_helpers import (LAYOUTS, LINEAR_OPTIM, LLAMA, ONE_DEVICE, experiment, lm_batches,
                              max_abs_diff, one_device, program, train)

from jaxformer.models import family

STEPS = 20


@pytest.fixture(scope='module')
def llama_reference():
  """One device: (loss, params) after one linear-optimizer step; AdamW losses of STEPS steps."""
  one = program(experiment('llama', LLAMA, parallel=ONE_DEVICE, optim=LINEAR_OPTIM),
                one_device())
  adamw = program(experiment('llama', LLAMA, parallel=ONE_DEVICE), one_device())
  return train(one, lm_batches(1)), train(adamw, lm_batches(STEPS))[0]


@pytest.mark.parametrize('layout', [
    'dp2_fsdp2_tp2', 'fsdp4_tp2_sp',
    pytest.param('dp8', marks=pytest.mark.slow),
    pytest.param('fsdp8', marks=pytest.mark.slow),
    pytest.param('tp8', marks=pytest.mark.slow),
])
def test_llama_layout_equals_one_device(layout, llama_reference):
  (one_ref_loss, one_ref_params), ref_losses = llama_reference
  one = program(experiment('llama', LLAMA, parallel=LAYOUTS[layout], optim=LINEAR_OPTIM))
  assert one.layout.mesh.devices.size == 8
  one_loss, one_params = train(one, lm_batches(1))
  np.testing.assert_allclose(one_loss, one_ref_loss, atol=1e-5, rtol=0)
  assert max_abs_diff(one_params, one_ref_params) < 1e-5
  losses, _ = train(program(experiment('llama', LLAMA, parallel=LAYOUTS[layout])),
                    lm_batches(STEPS))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
  # The run learned something, so equal curves are not two flat lines.
  assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize('layout', ['dp8', 'fsdp8', 'tp8'])
def test_one_step_of_every_layout_equals_one_device(layout, llama_reference):
  """The default suite's cheap check of the layouts whose 20-step runs are marked slow."""
  ref_losses, ref_params = llama_reference[0]
  losses, params = train(program(experiment('llama', LLAMA, parallel=LAYOUTS[layout],
                                            optim=LINEAR_OPTIM)), lm_batches(1))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert max_abs_diff(params, ref_params) < 1e-5


T5 = dict(vocab_size=64, d_model=32, num_layers=2, max_length=32,
          attention=dict(num_heads=4, head_dim=8), ffn=dict(hidden_dim=64))
BERT = dict(vocab_size=64, d_model=32, num_layers=2, max_length=32, type_vocab_size=2,
            attention=dict(num_heads=4), ffn=dict(hidden_dim=64))
MIXTRAL = dict(vocab_size=64, d_model=32, num_layers=2, max_length=32,
               attention=dict(num_heads=4, num_kv_heads=2), ffn=dict(hidden_dim=64),
               moe=dict(num_experts=4, top_k=2))


def _chains(rng, batch, length, vocab, low=3):
  """Rows where each token follows from the previous one (t -> 5 t + 3), from random starts."""
  out = np.empty((batch, length), np.int64)
  out[:, 0] = rng.integers(low, vocab, batch)
  for i in range(1, length):
    out[:, i] = low + (5 * out[:, i - 1] + 3) % (vocab - low)
  return out.astype(np.int32)


def seq2seq_batches(n, batch=8, length=16, vocab=64):
  """Copy: the decoder reproduces the (padded) encoder input."""
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    enc = _chains(rng, batch, length, vocab)
    seg = np.ones((batch, length), np.int32)
    seg[1, 12:] = 0  # a padded row
    dec = np.concatenate([np.full((batch, 1), 1, np.int32), enc], axis=1)
    out.append({'encoder_inputs': enc, 'encoder_segment_ids': seg,
                'decoder_inputs': dec[:, :-1], 'decoder_targets': dec[:, 1:],
                'decoder_segment_ids': np.ones((batch, length), np.int32),
                'loss_mask': np.ones((batch, length), np.float32)})
  return out


def mlm_batches(n, batch=8, length=16, vocab=64):
  """Masked tokens of chains: each is predictable from its neighbours."""
  rng = np.random.default_rng(2)
  out = []
  for _ in range(n):
    targets = _chains(rng, batch, length, vocab)
    masked = rng.random((batch, length)) < 0.3
    out.append({'inputs': np.where(masked, 2, targets).astype(np.int32), 'targets': targets,
                'segment_ids': np.ones((batch, length), np.int32),
                'loss_mask': masked.astype(np.float32)})
  return out


@pytest.mark.parametrize('name,fam,model,task,batches', [
    pytest.param('t5', 't5', T5, 'span_corruption', seq2seq_batches, marks=pytest.mark.slow),
    pytest.param('bert', 'bert', BERT, 'mlm', mlm_batches, marks=pytest.mark.slow),
    ('mixtral', 'mixtral', MIXTRAL, 'lm', lambda n: lm_batches(n, seed=3)),
])
def test_other_families_under_dp2_fsdp2_tp2_equal_one_device(name, fam, model, task, batches):
  del name
  data = dict(target_len=16) if task == 'span_corruption' else {}
  build = lambda parallel, optim=None, devices=None: program(  # noqa: E731
      experiment(fam, model, task=task, parallel=parallel, optim=optim, **data), devices)
  # One step of the optimizer that is linear in the gradient: same loss and parameters.
  ref_loss, ref_params = train(build(ONE_DEVICE, LINEAR_OPTIM, one_device()), batches(1))
  loss, params = train(build(LAYOUTS['dp2_fsdp2_tp2'], LINEAR_OPTIM), batches(1))
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
  assert max_abs_diff(params, ref_params) < 1e-5
  # STEPS AdamW steps: the same loss curve.
  ref_losses, _ = train(build(ONE_DEVICE, devices=one_device()), batches(STEPS))
  losses, _ = train(build(LAYOUTS['dp2_fsdp2_tp2']), batches(STEPS))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
  assert losses[-1] < losses[0]
  # The family really is what it claims (encoder-decoder / encoder / MoE).
  cfg = family(fam, **model)
  assert {'t5': cfg.family == 'encoder_decoder', 'bert': cfg.family == 'encoder',
          'mixtral': cfg.moe.num_experts == 4}[fam]
