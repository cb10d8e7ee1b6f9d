"""A run folder nobody can damage and a command line that never surprises (issue 14).

Config overrides go through the real command line (`python -m jaxformer.train`), as a user's
would. Each test fails on the code before the fix it covers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jaxformer.data import sources
from jaxformer.data.config import DataConfig
from jaxformer.train.metrics import ProgressBar, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, 'configs', 'quickstart.py')


def env(**extra):
  e = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAXFORMER_DEBUG')}
  e.update(PYTHONPATH=ROOT + os.pathsep + e.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu', **extra)
  return e


def cli(module, *args, check=False, timeout=300):
  return subprocess.run([sys.executable, '-m', module, *args], env=env(), capture_output=True,
                        text=True, timeout=timeout, check=check)


def train(workdir, *overrides, steps=4, check=True):
  return cli('jaxformer.train', f'--config={QUICK}:size=tiny', f'--workdir={workdir}',
             f'--config.train.steps={steps}', '--config.train.progress=false',
             '--config.train.sample_tokens=0', '--config.train.test_batches=0',
             '--config.train.async_checkpoint=false', *overrides, check=check)


def one_line_error(out, *fragments):
  """rc 2, stderr ends with one 'error: ...' line holding the fragments, and no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), out.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, (fragment, last)
  return last


# ------------------------------------------------------------------ overrides
def test_the_schedule_follows_train_steps_unless_set(tmp_path):
  """Tiny presets once pinned optim.total_steps=2: a 20-step run trained at the floor rate."""
  out = train(tmp_path / 'a', '--config.train.log_every=1', '--config.train.eval_every=100',
              steps=20)
  lrs = [r['lr'] for r in read_metrics(tmp_path / 'a' / 'metrics.jsonl') if 'lr' in r]
  assert len(lrs) == 20 and lrs[10] > 0.5 * max(lrs) and lrs[-1] < 0.2 * max(lrs)
  with open(tmp_path / 'a' / 'config.json') as f:
    assert json.load(f)['optim']['total_steps'] == 20
  out = train(tmp_path / 'b', '--config.optim.total_steps=2', steps=3)
  assert 'optim.total_steps=2 is shorter than train.steps=3' in out.stderr


def test_fields_whose_default_is_none_override_with_their_type(tmp_path):
  train(tmp_path / 'w', '--config.optim.ema_decay=0.99', '--config.model.attention.window=8',
        '--config.optim.grad_clip_norm=0.5', steps=2)
  with open(tmp_path / 'w' / 'config.json') as f:
    cfg = json.load(f)
  assert cfg['optim']['ema_decay'] == 0.99 and cfg['model']['attention']['window'] == 8
  assert cfg['optim']['grad_clip_norm'] == 0.5


@pytest.mark.parametrize('args,fragments', [
    (['--config.model.foo=1'], ['--config.model.foo', "config.model has no field 'foo'",
                                "'d_model'"]),
    (['--config.optim.lr=inf'], ['optim.lr=inf', 'finite']),
    (['--config.parallel.mesh.data=3'], ['parallel.mesh', 'needs 3 devices', '1 is available']),
])
def test_bad_overrides_fail_in_one_line(tmp_path, args, fragments):
  one_line_error(train(tmp_path / 'w', *args, check=False), *fragments)
  assert not (tmp_path / 'w' / 'config.json').exists()


def test_a_malformed_preset_argument_fails_in_one_line_and_debug_shows_the_traceback(tmp_path):
  args = [f'--config={QUICK}:tiny', f'--workdir={tmp_path}']
  one_line_error(cli('jaxformer.train', *args), "config argument 'tiny'", ':key=value',
                 "size (one of ['tiny', 'small']")
  debug = cli('jaxformer.train', *args, '--debug')
  assert debug.returncode != 0 and 'Traceback' in debug.stderr and 'ConfigError' in debug.stderr


# ------------------------------------------------------------------ run folders
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('run') / 'w'
  train(workdir, '--config.train.checkpoint_every=2', '--config.train.log_every=1',
        '--config.train.eval_every=100')
  return workdir


def copy_run(trained, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained, workdir)
  return workdir


def test_a_refused_run_writes_nothing_into_the_folder(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  before = {name: (workdir / name).read_bytes() for name in ('config.json', 'params.txt')}
  out = train(workdir, '--config.model.ffn.hidden_dim=48', steps=6, check=False)
  one_line_error(out, 'does not fit the model', 'ffn')
  out = cli('jaxformer.eval', f'--workdir={workdir}', f'--config={QUICK}:size=tiny',
            '--config.model.ffn.hidden_dim=48')
  one_line_error(out, 'does not fit the model')
  assert {name: (workdir / name).read_bytes() for name in before} == before
  assert cli('jaxformer.generate', f'--workdir={workdir}', '--max_new_tokens=4').returncode == 0


def _garble(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  path = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes((b ^ 0x5A) for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))  # same size, other bytes


def test_bytes_garbled_in_place_are_detected_and_the_step_moved_aside(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  _garble(workdir / 'checkpoints' / '4')
  out = train(workdir, '--config.train.log_every=1', steps=4)
  assert 'checksum' in out.stderr and 'cannot be restored' in out.stderr, out.stderr[-3000:]
  assert 'resumed from step 2' in out.stderr
  assert sorted(os.listdir(workdir / 'checkpoints_corrupt')) == ['4']
  # The run redid steps 3 and 4 from the good step 2: the same losses as the first time.
  ref = {r['step']: r['loss'] for r in read_metrics(trained / 'metrics.jsonl') if 'loss' in r}
  got = {r['step']: r['loss'] for r in read_metrics(workdir / 'metrics.jsonl') if 'loss' in r}
  assert got == ref


def test_evaluation_reads_only(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  _garble(workdir / 'checkpoints' / '4')
  listing = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  out = cli('jaxformer.eval', f'--workdir={workdir}', '--split=validation', '--batches=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout[out.stdout.index('{'):])['step'] == 2
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')) == listing
  # A run folder without checkpoints: one clear line, no Orbax traceback.
  shutil.rmtree(workdir / 'checkpoints')
  one_line_error(cli('jaxformer.eval', f'--workdir={workdir}'), 'no checkpoint in',
                 'train first')


def test_a_second_writer_is_refused_and_a_killed_run_does_not_block(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  first = subprocess.Popen(
      [sys.executable, '-m', 'jaxformer.train', f'--config={QUICK}:size=tiny',
       f'--workdir={workdir}', '--config.train.steps=100000', '--config.train.progress=false',
       '--config.train.checkpoint_every=100000', '--config.train.eval_every=100000'],
      env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while len(read_metrics(workdir / 'metrics.jsonl')) <= len(read_metrics(
        trained / 'metrics.jsonl')):
      assert time.time() < deadline and first.poll() is None
      time.sleep(0.2)
    lines = len(read_metrics(workdir / 'metrics.jsonl'))
    second = train(workdir, steps=200000, check=False)
    one_line_error(second, 'is in use by another run', f'pid {first.pid}')
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert len(read_metrics(workdir / 'metrics.jsonl')) >= lines  # the second appended nothing
  # The lock died with its process: a rerun takes the folder (and resumes from step 4).
  out = train(workdir, steps=5)
  assert 'resumed from step 4' in out.stderr


def test_rerunning_a_finished_run_does_nothing_more(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  before = (workdir / 'metrics.jsonl').read_bytes()
  out = train(workdir, '--config.train.test_batches=1', '--config.train.sample_tokens=8')
  assert 'nothing more to do' in out.stderr
  assert '--- sample' not in out.stdout
  assert (workdir / 'metrics.jsonl').read_bytes() == before


def test_eval_reads_the_whole_split_by_default(trained):
  out = cli('jaxformer.eval', f'--workdir={trained}', '--split=test', check=True)
  result = json.loads(out.stdout[out.stdout.index('{'):])
  assert result['whole_split'] is True and result['batches'] > 32
  part = cli('jaxformer.eval', f'--workdir={trained}', '--split=test', '--batches=2', check=True)
  part = json.loads(part.stdout[part.stdout.index('{'):])
  assert part['whole_split'] is False and part['batches'] == 2


def test_generate_refuses_impossible_lengths(trained):
  one_line_error(cli('jaxformer.generate', f'--workdir={trained}', '--max_new_tokens=-5'),
                 '--max_new_tokens=-5', 'positive')
  one_line_error(cli('jaxformer.generate', f'--workdir={trained}', '--max_new_tokens=100000'),
                 '--max_new_tokens=100000', 'at most 31 new tokens fit')


def test_a_nan_on_a_fresh_run_says_nothing_was_saved(tmp_path):
  out = train(tmp_path / 'w', '--config.optim.lr=1e30', '--config.train.log_every=1',
              '--config.train.checkpoint_every=100', steps=6, check=False)
  last = one_line_error(out, 'NaN/Inf')
  assert 'no checkpoint was written yet' in last and 'step None' not in last


# ------------------------------------------------------------------ data, progress
def test_an_interrupted_dataset_preparation_is_cleaned_up(tmp_path):
  cfg = DataConfig.from_dict(dict(name='synthetic_seq2seq/copy', task='seq2seq',
                                  data_dir=str(tmp_path)))
  # What a killed preparation leaves: TFDS's incomplete.* folder next to the final one.
  version_dir = tmp_path / 'synthetic_seq2seq' / 'copy'
  leftover = version_dir / 'incomplete.1a2b3c.1.0.0'
  (leftover / 'x').mkdir(parents=True)
  b = sources.builder(cfg)
  assert b.is_prepared()
  assert not leftover.exists()
  assert not [p for p in version_dir.iterdir() if p.name.startswith('incomplete')]


class _Terminal:
  """A terminal stream for ProgressBar: a TTY with a chosen width."""

  def __init__(self):
    self.lines = []

  def isatty(self):
    return True

  def write(self, text):
    self.lines.append(text)

  def flush(self):
    pass


@pytest.mark.parametrize('columns', [0, 12])
def test_progress_falls_back_to_plain_lines_where_no_bar_fits(monkeypatch, columns):
  monkeypatch.setattr(shutil, 'get_terminal_size', lambda fallback=None: os.terminal_size(
      (columns, 24)))
  stream = _Terminal()
  bar = ProgressBar(10, stream=stream)
  assert not bar.enabled
  bar.update(5, {'loss': 1.5, 'lr': 1e-3})
  text = ''.join(stream.lines)
  assert 'step 5/10' in text and 'loss 1.5' in text


def test_progress_through_a_pipe_is_one_plain_line_per_logged_step(tmp_path):
  out = cli('jaxformer.train', f'--config={QUICK}:size=tiny', f'--workdir={tmp_path / "w"}',
            '--config.train.steps=3', '--config.train.log_every=1',
            '--config.train.sample_tokens=0', '--config.train.test_batches=0', check=True)
  steps = [line.split()[1] for line in out.stderr.splitlines() if line.startswith('step ')
           and ' eval:' not in line]
  assert steps == ['1/3', '2/3', '3/3']
