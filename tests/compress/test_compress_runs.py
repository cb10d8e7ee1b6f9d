"""Compression end to end through the trainer and the CLIs (slow: each trains a run).

  * the distillation acceptance: a student distilled from a larger teacher beats the same
    student trained alone for the same steps (experiments/distill.py --quick, T = 1);
  * a distilled run's checkpoints hold no teacher, and the teacher's parameters leave the train
    step unchanged;
  * `python -m jaxformer.compress prune` writes a run folder that the eval command reads, with
    the smaller shapes and exactly the requested sparsity;
  * a pruned run's masks are checkpointed and restored.
"""

import csv
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxformer.cli import load_run_config
from jaxformer.compress import prune as P
from jaxformer.train.trainer import Trainer

from prune_helpers import ROOT, tiny_config


def _saved(step_dir):
  """The top-level entries of a checkpoint's train state."""
  meta = ocp.StandardCheckpointer().metadata(str(step_dir / 'state'))
  meta = getattr(meta, 'item_metadata', meta)
  return getattr(meta, 'tree', meta)


STEPS = dict(batch_size=8, steps=4, eval_every=4, checkpoint_every=2, log_every=1, eval_batches=1,
             test_batches=0, sample_tokens=0)


@pytest.mark.slow  # ~2.5 CPU-minutes: a teacher (1200 steps) and two students (300 steps)
def test_distilled_student_beats_student_alone(tmp_path):
  # Its own process on one CPU device, as the recorded figures (docs/results.md) were made.
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  out = tmp_path / 'distill.csv'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'distill.py'),
                         '--quick', '--temperatures', '1', '--workdir', str(tmp_path / 'runs'),
                         '--out', str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    rows = {r['model']: r for r in csv.DictReader(f)}
  assert os.path.isfile(tmp_path / 'distill.png')
  alone, distilled = rows['student_alone'], rows['student_distilled_T1']
  assert int(distilled['params']) == int(alone['params']) < int(rows['teacher']['params'])
  print({k: r['eval_loss'] for k, r in rows.items()})
  assert float(distilled['eval_loss']) < float(alone['eval_loss']) - 0.02, rows


@pytest.mark.slow  # two short runs
def test_distilled_run_keeps_the_teacher_out_of_its_checkpoints(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  Trainer(tiny_config(model=dict(d_model=48), **STEPS), teacher_dir).run()
  config = tiny_config(distill=dict(teacher=teacher_dir, alpha=0.5), **STEPS)
  trainer = Trainer(config, str(tmp_path / 'student'))
  before = jax.device_get(trainer.state['teacher'])
  trainer.run()
  after = jax.device_get(trainer.state['teacher'])
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  step_dir = tmp_path / 'student' / 'checkpoints' / '4'
  assert step_dir.is_dir()
  assert set(_saved(step_dir)) == {'params', 'opt_state', 'step'}
  # Resuming reads the teacher again from its run; evaluation needs none.
  again = Trainer(load_run_config(str(tmp_path / 'student')), str(tmp_path / 'student'),
                  mode='eval')
  assert 'teacher' not in again.state
  again.close()


@pytest.mark.slow  # a short run, the prune command, an evaluation
def test_prune_command_writes_a_smaller_run(tmp_path):
  run = str(tmp_path / 'run')
  Trainer(tiny_config(**STEPS), run).run()
  out = str(tmp_path / 'out')
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-m', 'jaxformer.compress', 'prune', f'--workdir={run}',
                         f'--out={out}', '--heads=1', '--neurons=16', '--sparsity=0.5'],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  pruned = Trainer(load_run_config(out), out, mode='eval')
  assert (pruned.exp.model.num_heads, pruned.exp.model.ffn_hidden_dim) == (1, 48)
  params = jax.device_get(pruned.model_params())
  report = P.sparsity_report(params)
  assert report['zeros'] == P.count(0.5, report['eligible'])
  assert np.isfinite(pruned.evaluate(pruned.exp.data.eval_split, 1)['loss'])
  pruned.close()
  bad = subprocess.run([sys.executable, '-m', 'jaxformer.compress', 'prune', f'--workdir={run}',
                        f'--out={tmp_path / "bad"}', '--sparsity=1.0'],
                       capture_output=True, text=True, env=env, cwd=ROOT)
  assert bad.returncode == 2 and 'compress.prune.sparsity=1.0 is invalid' in bad.stderr


@pytest.mark.slow  # a short run, resumed
def test_pruning_masks_are_checkpointed_and_restored(tmp_path):
  prune = dict(method='magnitude', sparsity=0.5, schedule='gradual', start=0, end=4, every=2)
  run = str(tmp_path / 'run')
  trainer = Trainer(tiny_config(prune=prune, **dict(STEPS, steps=3)), run)
  trainer.run()
  masks = jax.device_get(trainer.state['prune_masks'])
  assert 'prune_masks' in _saved(tmp_path / 'run' / 'checkpoints' / '3')
  resumed = Trainer(tiny_config(prune=prune, **dict(STEPS, steps=5)), run)
  assert int(resumed.state['step']) == 3
  assert jax.tree.all(jax.tree.map(np.array_equal, masks,
                                   jax.device_get(resumed.state['prune_masks'])))
  resumed.run()  # the step from step 4 runs the last event: sparsity 0.5 exactly
  dead = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(resumed.state['prune_masks']))
  assert dead == resumed.program.pruner.expected_zeros(4) == P.count(
      0.5, resumed.program.pruner.size())
