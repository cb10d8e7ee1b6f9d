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


def test_parallel_layouts_writes_csv_plot_and_matches_the_textbook(tmp_path):
  import parallel_layouts  # noqa: E402  (experiments/parallel_layouts.py)
  out = str(tmp_path / 'layouts.csv')
  rows = parallel_layouts.main(['--tiny', '--out', out])
  with open(out) as f:
    saved = list(csv.DictReader(f))
  assert [r['layout'] for r in saved] == list(parallel_layouts.LAYOUTS)
  by = {r['layout']: r for r in rows}
  # FSDP keeps 1/8 of parameters and optimizer state per device, data parallelism all of it.
  assert by['fsdp8']['param_bytes'] * 8 == pytest.approx(by['dp8']['param_bytes'], rel=0.05)
  # Data parallelism all-reduces the gradients once, as the textbook says (small reductions of
  # the loss and metrics aside).
  assert 0.99 < by['dp8']['ratio'] < 1.05, by['dp8']
  # FSDP gathers every layer's weights for the forward and again for the backward, and reduces
  # their gradients once (all-reduce + slice on CPU, reduce-scatter elsewhere).
  fsdp, layers = by['fsdp8'], by['fsdp8']['layer_param_bytes']
  assert fsdp['all_gather_bytes'] >= 2 * layers
  assert fsdp['all_reduce_bytes'] + fsdp['reduce_scatter_bytes'] >= layers
  assert by['tp8']['all_reduce_bytes'] >= by['tp8']['textbook_bytes']  # 4 per layer at least
  assert os.path.getsize(out[:-4] + '.png') > 1000


def test_moe_dispatch_writes_csv_plot_and_counts_fewer_flops_than_dense(tmp_path):
  import moe_dispatch  # noqa: E402  (experiments/moe_dispatch.py)
  out = str(tmp_path / 'moe.csv')
  rows = moe_dispatch.main(['--experts', '4,8', '--batch', '2', '--length', '16', '--d-model',
                            '16', '--ffn', '32', '--repeats', '1', '--out', out])
  with open(out) as f:
    saved = list(csv.DictReader(f))
  assert [(int(r['experts']), r['dispatch']) for r in saved] == [
      (e, d) for e in (4, 8) for d in moe_dispatch.DISPATCHES]
  assert all(r['status'] == 'ok' for r in rows), rows
  by = {(r['experts'], r['dispatch']): r for r in rows}
  # Dense runs all E experts on every token, capacity E * C slots per row (C = ceil(1.25 * 2 *
  # 16 / E)): at E = 8 that is 8 * 5 = 40 slots per row against dense's 8 * 16 = 128.
  assert by[(8, 'capacity')]['flops'] < 0.6 * by[(8, 'dense')]['flops']
  # Ragged: k N = 64 rows in blocks of 8 (at most one padded block per expert) against dense's
  # 8 experts x 32 tokens.
  assert by[(8, 'ragged')]['flops'] < 0.6 * by[(8, 'dense')]['flops']
  assert by[(8, 'dense')]['flops'] > 1.5 * by[(4, 'dense')]['flops']  # linear in E
  assert by[(4, 'dense')]['flops_ratio_vs_dense'] == 1.0
  assert os.path.getsize(out[:-4] + '.png') > 1000


def test_pipeline_bubble_counts_the_executed_schedule(tmp_path):
  import pipeline_bubble  # noqa: E402  (experiments/pipeline_bubble.py)
  out = str(tmp_path / 'bubble.csv')
  rows = pipeline_bubble.main(['--stages', '2,4', '--microbatches', '2,4', '--repeats', '1,2',
                               '--out', out])
  with open(out) as f:
    saved = list(csv.DictReader(f))
  assert len(saved) == len(rows) == 8
  by = {(r['stages'], r['microbatches'], r['repeats']): r for r in rows}
  assert by[(4, 2, 2)]['status'].startswith('refused')  # circular with M < S
  for (s, m, r), row in by.items():
    if row['status'] == 'ok':
      assert row['idle'] == s * (s - 1)  # S - 1 idle iterations per stage
      assert row['iterations'] == r * m + s - 1
      assert row['bubble'] == pytest.approx((s - 1) / (r * m + s - 1), abs=1e-6)
  assert os.path.getsize(out[:-4] + '.png') > 1000
