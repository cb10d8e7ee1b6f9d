"""Sequence-length curriculum in the trainer (F7, issue 13): the schedule's lengths and batch
sizes at given steps, batches of those shapes in a real run, the same logged losses after a
kill and resume mid-curriculum, and refusals that name the field."""

import os
import random
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxformer.config import ConfigError
from jaxformer.data.curriculum import Curriculum, make_curriculum_pipeline
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.experiment import Experiment, default_config
from jaxformer.train.metrics import read_metrics
from jaxformer.train.trainer import Trainer
from test_trainer import QUICK, env, last_losses, quick_config, train_cmd, wait_for_step


def test_the_schedule_gives_each_step_its_length_and_batch_size():
  cur = Curriculum.from_spec(((0, 64), (100, 128), (250, 256)), seq_len=256, batch_size=8)
  got = {step: (cur.at(step).seq_len, cur.at(step).batch_size)
         for step in (0, 99, 100, 249, 250, 10**6)}
  # Without a batch size a stage keeps the 8 x 256 tokens of a full-length step.
  assert got == {0: (64, 32), 99: (64, 32), 100: (128, 16), 249: (128, 16), 250: (256, 8),
                 10**6: (256, 8)}
  assert cur.tokens_through(300) == 300 * 8 * 256
  explicit = Curriculum.from_spec(((0, 64, 8), (10, 256)), seq_len=256, batch_size=8)
  assert [(s.seq_len, s.batch_size) for s in explicit.stages] == [(64, 8), (256, 8)]
  assert explicit.tokens_through(12) == 10 * 64 * 8 + 2 * 256 * 8
  # No curriculum: one stage of train.batch_size rows of data.seq_len.
  exp = Experiment.from_config(quick_config())
  assert exp.curriculum() == Curriculum.constant(32, 8)


def test_the_curriculum_is_overridable_from_the_command_line():
  c = default_config(train={'curriculum': [[0, 16], [3, 32]]})
  assert c.train.curriculum == ((0, 16), (3, 32))  # a tuple field, so the flag parses into it
  argv = ['prog', f'--config={QUICK}:size=tiny',
          '--config.train.curriculum=((0, 8), (5, 16, 8), (9, 32))']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  exp = Experiment.from_config(values.config)
  assert [(s.start, s.seq_len, s.batch_size) for s in exp.curriculum().stages] == [
      (0, 8, 16), (5, 16, 8), (9, 32, 4)]


@pytest.mark.parametrize('change,match', [
    ({'curriculum': ((1, 16), (3, 32))}, r'train.curriculum\[0\]=\(1, 16\).*start at step 0'),
    ({'curriculum': ((0, 16), (3, 32), (3, 16))}, r'train.curriculum\[2\].*strictly increasing'),
    ({'curriculum': ((0, 16), (3, 64))}, r'train.curriculum\[1\].*exceeds data.seq_len=32'),
    ({'curriculum': ((0, 8), (3, 16))}, r'longest stage \(16\) must be data.seq_len=32'),
    ({'curriculum': ((0, 24), (3, 32))}, r'train.curriculum\[0\].*tokens per step.*8 x 32 = '
                                         r'256.*\(0, 24, batch_size\)'),
    ({'curriculum': ((0, 16, 0), (3, 32))}, r'train.curriculum\[0\].*batch_size must be a '
                                            r'positive'),
    ({'curriculum': ((0, '16'),)}, r"train.curriculum\[0\]\[1\]='16' is invalid"),
    ({'curriculum': ((0, 8, 16, 1), (3, 32))}, r'train.curriculum\[0\].*\(start_step, seq_len'),
    ({'curriculum': 16}, r'train.curriculum=16 is invalid'),
    ({'curriculum': ((0, 16, 6), (3, 32))}, r'train.curriculum\[0\] batch_size=6 .*'
                                            r'optim.grad_accum_steps=4'),
    ({'curriculum': ((0, 16), (3, 32)), 'data.worker_count': 2}, r'data.worker_count=2.*must be 0'),
    ({'curriculum': ((0, 14, 16), (3, 32)), 'parallel.mesh': {'context': 2, 'data': 1}},
     r'train.curriculum\[0\] seq_len=14.*multiple of 4'),
])
def test_curricula_that_cannot_run_are_refused_naming_the_field(change, match):
  c = quick_config(batch_size=8)
  c.optim.grad_accum_steps = 4
  d = c.to_dict()
  for key, value in change.items():
    section, _, field = key.rpartition('.')
    target = d[section] if section else d['train']
    if isinstance(value, dict):
      target[field].update(value)
    else:
      target[field] = value
  if 'parallel.mesh' in change:
    d['model']['attention']['impl'] = 'ring'
  with pytest.raises(ConfigError, match=match):
    Experiment.from_config(d)


def test_images_have_no_length_to_schedule():
  from jaxformer.train.experiment import load_config
  root = os.path.dirname(QUICK)
  vit = load_config(os.path.join(root, 'vit.py'), 'size=tiny')
  vit.train.curriculum = ((0, vit.data.seq_len),)
  with pytest.raises(ConfigError, match="train.curriculum.*model.family='vit'"):
    Experiment.from_config(vit)


def test_a_stage_batch_the_devices_cannot_split_is_refused_before_compiling(tmp_path):
  c = quick_config(batch_size=8, curriculum=((0, 16, 4), (3, 32)))  # 8 simulated devices
  with pytest.raises(ConfigError, match=r'train.curriculum\[0\] batch_size=4 .*8 devices'):
    Trainer(c, str(tmp_path / 'w'))


def test_a_checkpoint_in_a_changed_stage_is_refused_and_kept(tmp_path):
  """The refusal reaches the caller through Orbax as a DataStateError, not as an unreadable
  checkpoint (which would be moved aside)."""
  data = Experiment.from_config(quick_config()).data

  def pipeline(spec):
    cur = Curriculum.from_spec(spec, seq_len=32, batch_size=8)
    return make_curriculum_pipeline(data, cur, 'train', seed=0, process_index=0,
                                    process_count=1)

  saved = pipeline(((0, 16), (2, 32)))
  for _ in range(3):
    next(saved)
  state = {'w': jnp.ones((4,))}
  with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, state, {'step': 3}, data=saved, force=True)
    saved.close()
    changed = pipeline(((0, 16), (2, 32, 16)))
    with pytest.raises(ckpt_lib.DataStateError, match=r'curriculum stage 1 .*\(2, 32, 8\)'):
      ckpt.restore(jax.eval_shape(lambda: state), data=changed)
    changed.close()
    assert ckpt.all_steps() == [3]


def curriculum_config(steps=6):
  c = quick_config(batch_size=8, steps=steps, log_every=1, checkpoint_every=2, eval_every=1000,
                   eval_batches=0, test_batches=0, curriculum=((0, 16), (3, 32)))
  c.optim.total_steps = steps
  return c


def test_a_curriculum_run_has_the_scheduled_shapes_and_resumes_exactly(tmp_path):
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  trainer = Trainer(curriculum_config(), str(ref_dir))
  compiled, shapes = trainer.program.train_step, []

  def recording_step(state, batch):
    shapes.append((int(state['step']), batch['inputs'].shape, batch['targets'].shape))
    return compiled(state, batch)

  trainer.program.__dict__['train_step'] = recording_step
  trainer.run()
  # 8 x 32 tokens per step: 16 rows of 16 for steps 0-2, then 8 rows of 32.
  assert shapes == [(s, (16, 16), (16, 16)) for s in range(3)] + [
      (s, (8, 32), (8, 32)) for s in range(3, 6)]
  logged = [r for r in read_metrics(ref_dir / 'metrics.jsonl') if 'loss' in r]
  assert [(r['step'], r['seq_len'], r['batch_size']) for r in logged] == [
      (1, 16, 16), (2, 16, 16), (3, 16, 16), (4, 32, 8), (5, 32, 8), (6, 32, 8)]
  # What a run killed after step 5 leaves: the checkpoint of step 2 (mid stage 0, its data
  # position two batches in) and records of steps it will redo. The rerun restores its own
  # state and data position and crosses the stage boundary from there; it runs the steps the
  # reference compiled (same config, same devices), which spares two compilations.
  shutil.copytree(ref_dir, run_dir)
  for step in ('4', '6'):
    shutil.rmtree(run_dir / 'checkpoints' / step)
  (run_dir / 'result.json').unlink()
  rerun = Trainer(curriculum_config(), str(run_dir))
  assert int(rerun.state['step']) == 2 and rerun.train_iter.step == 2
  rerun.program.__dict__['train_step'] = compiled
  rerun.run()
  assert last_losses(str(run_dir)) == last_losses(str(ref_dir))  # exact, every step


@pytest.mark.slow
def test_sigkill_mid_curriculum_then_rerun_is_exactly_the_uninterrupted_run(tmp_path):
  steps = 8
  extra = ['--config.train.curriculum=((0, 16), (4, 32))']
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  subprocess.run(train_cmd(ref_dir, steps, extra), check=True, env=env(), capture_output=True)
  kill_at = random.Random(os.getpid()).randint(3, 6)
  proc = subprocess.Popen(train_cmd(run_dir, steps, extra), env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(run_dir, kill_at, proc, checkpoint=True)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = subprocess.run(train_cmd(run_dir, steps, extra), env=env(), capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'resumed from step' in done.stderr
  assert last_losses(run_dir) == last_losses(ref_dir)
  seq = {r['step']: r['seq_len'] for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
         if 'loss' in r}
  assert seq == {s: 16 if s <= 4 else 32 for s in range(1, steps + 1)}


@pytest.mark.slow
@pytest.mark.parametrize('mesh,impl', [({'stage': 2, 'data': 4}, None),
                                       ({'context': 2, 'data': 4}, 'ring')])
def test_a_curriculum_under_pipeline_or_context_parallelism_logs_the_one_device_losses(
    tmp_path, mesh, impl):
  """Pipeline micro-batches (optim.grad_accum_steps) and ring attention's chunks of every
  stage's shape, on 8 simulated devices."""
  def run(name, devices=None, **parallel):
    c = quick_config(batch_size=8, steps=4, log_every=1, checkpoint_every=100,
                     eval_every=1000, eval_batches=0, test_batches=0,
                     curriculum=((0, 16), (2, 32)))
    c.optim.total_steps = 4
    c.optim.grad_accum_steps = 2
    c.parallel.mesh.update(parallel)
    if impl and parallel:
      c.model.attention.impl = impl
    Trainer(c, str(tmp_path / name), devices=devices).run()
    return [(r['step'], r['seq_len'], r['batch_size'], r['loss'])
            for r in read_metrics(tmp_path / name / 'metrics.jsonl') if 'loss' in r]

  one, split = run('one', jax.devices()[:1]), run('split', **mesh)
  assert [r[:3] for r in split] == [r[:3] for r in one] == [
      (1, 16, 16), (2, 16, 16), (3, 32, 8), (4, 32, 8)]
  np.testing.assert_allclose([r[3] for r in split], [r[3] for r in one], rtol=1e-5)
