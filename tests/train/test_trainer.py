"""The training loop end to end: exact resume after SIGKILL, a clean checkpoint on SIGTERM,
non-finite losses never overwrite a good checkpoint, bad input fails before compilation, and
gradient accumulation equals one large batch (issue 3 acceptance)."""

import os
import random
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.models import build_model, family
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.experiment import load_config
from jaxformer.train.metrics import read_metrics
from jaxformer.train.step import make_train_step
from jaxformer.train.tasks import LossConfig
from jaxformer.train.trainer import NonFiniteLossError, Trainer
from jaxformer.train.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, 'configs', 'quickstart.py')


def quick_config(**train):
  sys.path.insert(0, os.path.dirname(QUICK))
  import importlib
  mod = importlib.import_module('quickstart')
  c = mod.get_config('size=tiny')
  c.train.batch_size = 8
  c.train.progress = False
  c.train.sample_tokens = 0
  c.train.async_checkpoint = False
  for k, v in train.items():
    c.train[k] = v
  return c


def train_cmd(workdir, steps, extra=()):
  return [sys.executable, '-m', 'jaxformer.train', f'--config={QUICK}:size=tiny',
          f'--workdir={workdir}', f'--config.train.steps={steps}',
          f'--config.optim.total_steps={steps}', '--config.train.batch_size=8',
          '--config.train.log_every=1', '--config.train.checkpoint_every=2',
          '--config.train.eval_every=1000', '--config.train.test_batches=0',
          '--config.train.sample_tokens=0', '--config.train.progress=false', *extra]


def env():
  e = dict(os.environ)
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  return e


def last_losses(workdir):
  """The logged loss of every step."""
  out = {}
  for rec in read_metrics(os.path.join(workdir, 'metrics.jsonl')):
    if 'loss' in rec:
      out[rec['step']] = rec['loss']
  return out


def restore_params(workdir):
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  state = ckpt._manager.restore(step)  # raw arrays, no target needed for comparison
  ckpt.close()
  return step, state


def committed_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for_step(workdir, step, proc, timeout=240, checkpoint=False):
  """Waits until the run logged `step` (and, with `checkpoint`, has committed a checkpoint)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f'training exited early: {proc.stderr.read()[-2000:]}')
    if (os.path.exists(path) and any(r.get('step', 0) >= step and 'loss' in r
                                     for r in read_metrics(path))
        and (not checkpoint or committed_steps(workdir))):
      return
    time.sleep(0.2)
  raise AssertionError('training did not reach the step in time')


def test_sigkill_then_rerun_is_exactly_the_uninterrupted_run(tmp_path):
  steps = 8
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  subprocess.run(train_cmd(ref_dir, steps), check=True, env=env(), capture_output=True)
  kill_at = random.Random(os.getpid()).randint(3, 6)
  proc = subprocess.Popen(train_cmd(run_dir, steps), env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(run_dir, kill_at, proc, checkpoint=True)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = subprocess.run(train_cmd(run_dir, steps), env=env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'resumed from step' in done.stderr
  assert last_losses(run_dir) == last_losses(ref_dir)  # exact float equality, every step
  # The steps the killed run logged after its checkpoint were dropped when it resumed: every
  # step has one training record, as in the uninterrupted run.
  logged = [r['step'] for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl')) if 'loss' in r]
  assert logged == list(range(1, steps + 1))
  s1, ref = restore_params(ref_dir)
  s2, got = restore_params(run_dir)
  assert s1 == s2 == steps
  for a, b in zip(jax.tree.leaves(ref['state']), jax.tree.leaves(got['state'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_leaves_a_complete_checkpoint_and_resume_continues(tmp_path):
  workdir = str(tmp_path / 'w')
  proc = subprocess.Popen(train_cmd(workdir, 400, ['--config.train.checkpoint_every=1000']),
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  step, state = restore_params(workdir)
  assert step >= 3
  chex.assert_tree_all_finite(state['state'])
  assert state['extras']['step'] == step


def test_nonfinite_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'w')
  Trainer(quick_config(steps=2, checkpoint_every=1), workdir).run()
  # Resume with an absurd learning rate: step 3 blows the weights up, step 4's loss is NaN/Inf.
  c = quick_config(steps=6, checkpoint_every=1, log_every=1)
  c.optim.lr = 1e30
  c.optim.total_steps = 6
  with pytest.raises(NonFiniteLossError, match='NaN/Inf'):
    Trainer(c, workdir).run()
  step, state = restore_params(workdir)
  assert step < 6
  chex.assert_tree_all_finite(state['state'])
  # With train.nonfinite='skip' the same run skips the bad updates and finishes.
  c.train.nonfinite = 'skip'
  out = Trainer(c, str(tmp_path / 'w')).run()
  assert out['step'] == 6
  assert out['last_train']['skipped_steps'] > 0


def test_bad_input_fails_before_compilation(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(WorkdirError, match='cannot write'):
    Trainer(quick_config(), str(blocker / 'sub'))
  c = quick_config()
  c.data.name = 'no_such_dataset_xyz'
  with pytest.raises(Exception, match='no_such_dataset_xyz'):
    Trainer(c, str(tmp_path / 'a'))
  c = quick_config(batch_size=6)  # 8 simulated devices
  with pytest.raises(ConfigError, match='train.batch_size'):
    Trainer(c, str(tmp_path / 'b'))
  c = quick_config()
  c.data.seq_len = 10_000
  with pytest.raises(ConfigError, match='data.seq_len'):
    Trainer(c, str(tmp_path / 'c'))
  c = quick_config()
  c.train.nonfinite = 'ignore'
  with pytest.raises(ConfigError, match="train.nonfinite='ignore'.*allowed values"):
    Trainer(c, str(tmp_path / 'd'))
  # An RNN carries its state along a row, so packed seq2seq rows would leak into each other.
  rnn = load_config(os.path.join(ROOT, 'configs', 'rnn_attention.py'), 'size=tiny')
  rnn.data.packing = 'first_fit'
  with pytest.raises(ConfigError, match="data.packing='first_fit'.*'none' for "
                     "model.family='rnn_seq2seq': it carries"):
    Trainer(rnn, str(tmp_path / 'e'))
  # Kinds that mix a whole row (Linformer, Nystromformer, FNet) cannot train on packed rows.
  c = quick_config()
  c.model.attention.kind = 'fnet'
  with pytest.raises(ConfigError, match="data.packing=.*model.attention.kind='fnet'"):
    Trainer(c, str(tmp_path / 'f'))


def test_incompatible_checkpoint_is_refused_naming_the_parameter(tmp_path):
  workdir = str(tmp_path / 'w')
  Trainer(quick_config(steps=2, checkpoint_every=1), workdir).run()
  c = quick_config(steps=4)
  c.model.ffn.hidden_dim = 48
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='ffn'):
    Trainer(c, workdir)


def test_accumulating_k_micro_batches_equals_one_large_batch():
  cfg = family('llama', vocab_size=50, d_model=32, num_layers=2, max_length=16,
               attention=dict(num_heads=4))
  model = build_model(cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = {
      'inputs': jax.random.randint(jax.random.key(1), (8, 16), 0, 50),
      'targets': jax.random.randint(jax.random.key(2), (8, 16), 0, 50),
      'loss_mask': jnp.ones((8, 16), jnp.float32),
  }

  def run(k):
    # SGD is linear in the gradient, so the comparison is exact up to summation order (Adam's
    # first step is ~lr * sign(g) and would amplify rounding in near-zero gradients).
    tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))
    if k > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    step = jax.jit(make_train_step(graphdef, rest, task='lm', model_cfg=cfg,
                                   loss_cfg=LossConfig(), tx=tx, accum_steps=k, seed=0))
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
    state, metrics = step(state, batch)
    return state['params'], metrics

  p1, m1 = run(1)
  p4, m4 = run(4)
  chex.assert_trees_all_close(nnx.to_pure_dict(p4), nnx.to_pure_dict(p1), atol=1e-6)
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)
  # And the update really moved the parameters.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), nnx.to_pure_dict(p1),
                       nnx.to_pure_dict(params))
  assert max(jax.tree.leaves(moved)) > 1e-3
