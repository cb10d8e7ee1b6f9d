"""The persistent compilation cache (`train.compilation_cache`, jaxformer/compile_cache.py)."""

import os
import re
import subprocess
import sys

from jaxformer import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, 'configs', 'llama.py')


def test_settings_resolve_to_directories(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.resolve('auto') == os.path.join(str(tmp_path), 'jaxformer', 'xla')
  assert compile_cache.resolve('none') is None and compile_cache.resolve('') is None
  assert compile_cache.resolve(str(tmp_path / 'c')) == str(tmp_path / 'c')
  monkeypatch.setenv(compile_cache.ENV, 'auto')
  assert compile_cache.resolve('auto') == os.path.join(str(tmp_path), 'jaxformer', 'xla')
  monkeypatch.setenv(compile_cache.ENV, 'none')
  assert compile_cache.resolve('auto') is None
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.resolve('auto') == str(tmp_path / 'env')
  assert compile_cache.resolve(str(tmp_path / 'given')) == str(tmp_path / 'given')


def _train(workdir, cache) -> tuple[int, int]:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # one device
  out = subprocess.run(
      [sys.executable, '-m', 'jaxformer.train', f'--config={LLAMA}:size=tiny',
       f'--workdir={workdir}', '--config.train.steps=2', '--config.optim.total_steps=2',
       '--config.train.eval_every=1000', '--config.train.test_batches=0',
       '--config.train.sample_tokens=0', '--config.train.progress=false',
       f'--config.train.compilation_cache={cache}'],
      env=env, check=True, capture_output=True, text=True)
  found = re.search(r'compilation cache \S+: (\d+) hits, (\d+) misses', out.stderr)
  assert found, out.stderr[-2000:]
  return int(found.group(1)), int(found.group(2))


def test_a_second_start_compiles_nothing_the_first_compiled(tmp_path):
  cache = tmp_path / 'cache'
  hits, misses = _train(tmp_path / 'first', cache)
  assert hits == 0 and misses > 0  # an empty cache: every program compiled and stored
  assert len(os.listdir(cache)) > 0
  hits2, misses2 = _train(tmp_path / 'second', cache)  # the same config, a new run folder
  assert misses2 == 0, (hits2, misses2)
  assert hits2 == misses


def test_none_turns_it_off():
  assert compile_cache.enable('none') is None
