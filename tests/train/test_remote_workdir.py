"""A `gs://` workdir stays an object-store URL end to end in jaxformer's own code (issue 10).

Object storage is simulated with `etils.epath.testing.mock_epath`, which routes every epath
operation on a `gs://` path to a local folder here; the test fails if any code turns the URL
into a local path (pathlib / os.path would then write below the current directory instead) or
relies on an operation object stores do not have (appending to a file).
"""

import json
import os

import numpy as np
from etils import epath
from etils.epath import testing as epath_testing

from jaxformer.cli import load_run_config
from jaxformer.train import workdir as workdir_lib
from jaxformer.train.metrics import MetricWriter, read_metrics

BUCKET = 'gs://bucket/'


def mocked(tmp_path):
  calls = []

  def local(p):
    text = os.fspath(p)
    assert text.startswith(BUCKET), f'a gs:// workdir became a local path: {text}'
    return str(tmp_path / text[len(BUCKET):])

  def one(fn, p, *args, **kwargs):
    calls.append(os.fspath(p))
    return fn(local(p), *args, **kwargs)

  def two(fn, p, dst, *args, **kwargs):
    calls.append(os.fspath(p))
    return fn(local(p), local(dst), *args, **kwargs)

  def open_(fn, p, mode):
    assert 'a' not in mode, 'object stores cannot append'
    return one(fn, p, mode)

  def glob(fn, p):
    return [BUCKET + os.path.relpath(x, tmp_path) for x in one(fn, p)]

  return calls, epath_testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, glob=glob, rename=two, replace=two)


def test_records_and_metrics_of_a_gs_workdir_go_to_the_bucket(tmp_path):
  calls, mock = mocked(tmp_path)
  with mock:
    path = workdir_lib.prepare_workdir(BUCKET + 'runs/r1')
    assert os.fspath(path) == BUCKET + 'runs/r1'
    workdir_lib.save_config(path, {'model': {'d_model': 32}})
    workdir_lib.write_text(path / 'result.json', json.dumps({'step': 3}))
    with MetricWriter(path, use_tensorboard=False) as writer:
      writer.write(1, {'loss': 2.5})
      writer.write(2, {'loss': np.float32(2.25)})
    with MetricWriter(path, use_tensorboard=False) as writer:  # a resumed run adds lines
      writer.write(3, {'loss': 2.0})
    assert [r['loss'] for r in read_metrics(path / 'metrics.jsonl')] == [2.5, 2.25, 2.0]
    assert load_run_config(BUCKET + 'runs/r1') == {'model': {'d_model': 32}}
  assert calls and all(c.startswith(BUCKET) for c in calls)
  local = tmp_path / 'runs' / 'r1'
  assert sorted(os.listdir(local)) == ['config.json', 'config.txt', 'metrics.jsonl',
                                       'result.json']
  assert not os.path.exists('gs:')  # nothing landed in a local folder named after the URL


def test_a_local_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = workdir_lib.prepare_workdir('runs/x')
  assert os.fspath(path) == str(tmp_path / 'runs' / 'x')
  assert isinstance(path, epath.Path)
