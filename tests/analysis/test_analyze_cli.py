"""`python -m jaxformer.analyze` on a tiny trained run: every method writes its PNG and numbers,
bad options fail with one clear line."""

import json
import os
import subprocess
import sys

import pytest

from jaxformer.analysis import report
from jaxformer.config import ConfigError
from jaxformer.train.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'train'))
from test_trainer import env, quick_config  # noqa: E402


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('analyze_run'))
  c = quick_config(steps=2, eval_every=1000, test_batches=0, checkpoint_every=2)
  Trainer(c, workdir).run()
  return workdir


def test_report_maps_on_a_tiny_model(tmp_path):
  """The CLI's core without a run: maps of every layer and head as a PNG grid and JSON."""
  from analysis_models import tiny
  from jaxformer.data.tokenizers import ByteTokenizer
  model = tiny()
  out = str(tmp_path / 'maps.png')
  result = report.analyze_text(model, 'lm', ByteTokenizer(), 'abc', 'maps', out)
  assert os.path.getsize(out) > 1000
  saved = json.load(open(tmp_path / 'maps.json'))
  assert saved['tokens'] == ['<bos>', 'a', 'b', 'c'] and result['layers'] == [0, 1]
  assert len(saved['weights']) == 2 and len(saved['weights'][0]) == 2  # [L, N, T, T]
  with pytest.raises(ConfigError, match="--method='heat' is invalid"):
    report.analyze_text(model, 'lm', ByteTokenizer(), 'abc', 'heat', out)


@pytest.mark.slow
def test_rollout_of_a_trained_run(run_dir, tmp_path):
  trainer = Trainer(json.load(open(os.path.join(run_dir, 'config.json'))), run_dir, mode='eval')
  try:
    out = str(tmp_path / 'rollout.png')
    result = report.analyze_text(trainer.model(), 'lm', trainer.tokenizer, 'def f(x):',
                                 'rollout', out)
    with pytest.raises(ConfigError, match='longer than model.max_length=32'):
      report.analyze_text(trainer.model(), 'lm', trainer.tokenizer, 'x' * 40, 'maps', out)
  finally:
    trainer.close()
  assert os.path.getsize(out) > 1000
  saved = json.load(open(tmp_path / 'rollout.json'))
  assert saved['tokens'][0] == '<bos>' and len(saved['rollout']) == 10
  assert result['layers'] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize('method', report.METHODS)
def test_cli_every_method(run_dir, tmp_path, method):
  out = tmp_path / f'{method}.png'
  subprocess.run([sys.executable, '-m', 'jaxformer.analyze', f'--workdir={run_dir}',
                  '--text=def f(x):', f'--method={method}', f'--out={out}', '--steps=8',
                  '--eps=0.05'], check=True, env=env(), capture_output=True, text=True)
  saved = json.loads(out.with_suffix('.json').read_text())
  assert out.stat().st_size > 1000 and saved['method'] == method
  if method == 'ig':
    assert saved['completeness_gap'] < 0.05  # 8 steps only; 64 steps: see test_attribution
  if method in ('fgsm', 'pgd'):
    assert saved['adversarial_loss'] > saved['clean_loss']
    assert saved['max_abs_delta'] <= 0.05 + 1e-8


@pytest.mark.slow
@pytest.mark.parametrize('flags, words', [
    (['--method=heatmap'], "--method='heatmap' is invalid"),
    (['--method=fgsm', '--eps=0'], '--eps=0.0 is invalid'),
    (['--method=maps', '--text=' + 'x' * 40], 'longer than model.max_length'),
])
def test_cli_bad_options(run_dir, tmp_path, flags, words):
  p = subprocess.run([sys.executable, '-m', 'jaxformer.analyze', f'--workdir={run_dir}',
                      '--text=abc', f'--out={tmp_path / "x.png"}', *flags], env=env(),
                     capture_output=True, text=True)
  assert p.returncode == 2 and words in p.stderr, p.stderr
