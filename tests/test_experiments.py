"""The benchmark scripts run end to end on tiny shapes and count FLOPs as documented.

No timing is asserted (timings belong to the scripts' output, not to tests).
"""

import csv
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import flash_benchmark  # noqa: E402  (experiments/ is not a package)


def test_flash_benchmark_flop_accounting():
  fwd = 4 * 2 * 16 * 1024 ** 2 * 64
  assert flash_benchmark.flops(2, 16, 1024, 64, False, 'fwd') == fwd
  assert flash_benchmark.flops(2, 16, 1024, 64, True, 'fwd') == fwd / 2
  assert flash_benchmark.flops(2, 16, 1024, 64, False, 'fwd+bwd') == 3.5 * fwd
  assert flash_benchmark.flops(2, 16, 1024, 64, True, 'fwd+bwd') == 3.5 * fwd / 2


def test_flash_benchmark_writes_csv_and_plot(tmp_path):
  out = str(tmp_path / 'fb.csv')
  flash_benchmark.main(['--cpu-smoke', '--lengths', '64', '--causal', 'true', '--out', out])
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert {(r['impl'], r['pass']) for r in rows} == {
      (i, p) for i in ('pallas', 'cudnn', 'xla') for p in ('fwd', 'fwd+bwd')}
  for r in rows:
    if r['impl'] == 'cudnn' and r['backend'] != 'gpu':
      assert r['status'] == 'unsupported'
      continue
    assert r['status'] == 'ok', r
    want = flash_benchmark.flops(int(r['batch']), int(r['heads']), 64, 64, True, r['pass'])
    assert float(r['tflops']) == pytest.approx(want / 1e12)
    assert float(r['tflops_per_s']) == pytest.approx(float(r['tflops']) / float(r['seconds']))
  assert os.path.getsize(out[:-4] + '.png') > 1000
