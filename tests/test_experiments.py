"""The benchmark scripts run end to end on tiny shapes and count FLOPs as documented.

No timing is asserted (timings belong to the scripts' output, not to tests).
"""

import csv
import os
import sys

import numpy as np
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


PEERS_TINY = ['--d-model', '32', '--layers', '1', '--batch', '2', '--seq', '16', '--repeats', '1',
              '--steps', '2']


@pytest.mark.slow  # 25 s; the model equivalence below stays in the default suite
def test_cpu_step_vs_peers_writes_csv_plot_and_every_system_trains_the_same_model(tmp_path):
  import cpu_step_vs_peers as peers  # noqa: E402  (experiments/cpu_step_vs_peers.py)
  out = str(tmp_path / 'peers.csv')
  rows = peers.main(PEERS_TINY + ['--out', out])
  with open(out) as f:
    saved = list(csv.DictReader(f))
  assert [r['system'] for r in saved] == peers.DEFAULT_SYSTEMS.split(',')
  assert tuple(saved[0]) == peers.FIELDS
  by = {r['system']: r for r in rows}
  torch_status = 'ok' if peers.torch_available() else 'no torch'
  assert by['torch_eager']['status'] == torch_status, by['torch_eager']
  ok = [r for r in rows if r['status'] == 'ok']
  assert {r['system'] for r in ok} >= {'trainer', 'bare', 'jax_ref'}, rows
  for r in ok:
    assert r['tokens_per_s_min'] <= r['tokens_per_s_median'] <= r['tokens_per_s_max']
    assert r['ratio_min'] <= r['ratio_to_trainer'] <= r['ratio_max']
    assert np.isfinite([r['loss_step0'], r['loss_last']]).all(), r
  assert by['trainer']['ratio_to_trainer'] == 1.0
  # Same weights, same batch: every system starts from the same loss. bare, jax_ref and torch
  # also share the optimizer, so after the warm-up and timed steps (4 updates) they still agree,
  # which needs equal gradients too (the trainer's warmup schedule makes its steps smaller).
  for r in ok:
    assert abs(r['loss_step0'] - by['trainer']['loss_step0']) < 1e-4, (r, by['trainer'])
  for r in ok:
    if r['system'] not in ('trainer', 'bare'):
      assert abs(r['loss_last'] - by['bare']['loss_last']) < 1e-4, (r, by['bare'])
  assert by['bare']['loss_last'] < by['bare']['loss_step0'] - 0.1  # it learns
  assert os.path.getsize(out[:-4] + '.png') > 1000


def test_cpu_step_vs_peers_reference_models_equal_jaxformer_on_random_weights():
  """Logits, not just losses: at jaxformer's init (std 0.02) every model's logits are near 0,
  so here every weight is redrawn large (norm scales around 1) before the three are compared."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxformer.models import build_model  # pylint: disable=import-outside-toplevel
  import cpu_step_vs_peers as peers  # noqa: E402
  exp = peers.experiment(peers.parse_args(PEERS_TINY + ['--layers', '2']))
  model = build_model(exp.model, seed=0)
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  batch = peers.make_batch(exp)
  want = np.asarray(model(batch['inputs']).logits)
  assert want.std() > 1.0  # far from uniform, so a wrong block would show
  weights = peers.reference_weights(nnx.state(model, nnx.Param))
  got = peers.reference_forward(weights, batch['inputs'], eps=exp.model.norm_eps,
                                theta=exp.model.position.rope_theta)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  import torch  # pylint: disable=import-outside-toplevel  (a test dependency: never skipped)
  with torch.no_grad():
    logits = peers.torch_model(exp, weights)(
        input_ids=torch.from_numpy(batch['inputs']).long(), use_cache=False).logits
  np.testing.assert_allclose(logits.numpy(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # four compiled gradients and two layer inits: about a minute on a busy CPU
def test_mamba_scaling_writes_csv_plot_and_mamba_memory_grows_linearly(tmp_path):
  import mamba_scaling  # noqa: E402  (experiments/mamba_scaling.py)
  out = str(tmp_path / 'ms.csv')
  rows = mamba_scaling.main(['--lengths', '32,64', '--d-model', '8', '--heads', '2',
                             '--d-state', '2', '--repeats', '1', '--out', out])
  with open(out) as f:
    assert [(r['layer'], r['length']) for r in csv.DictReader(f)] == [
        (name, n) for name in ('dense_attention', 'mamba') for n in ('32', '64')]
  by = {(r['layer'], r['length']): r for r in rows}
  assert all(r['status'] == 'ok' for r in rows)
  # XLA's static buffer assignment (deterministic): the dense n x n scores grow quadratically,
  # Mamba's [B, n, I, N] scan tensors linearly.
  assert by[('dense_attention', 64)]['growth_memory'] > 1.5
  assert by[('mamba', 64)]['growth_memory'] < 1.2
  assert by[('mamba', 64)]['memory_ratio_vs_dense'] == pytest.approx(
      by[('mamba', 64)]['peak_bytes'] / by[('dense_attention', 64)]['peak_bytes'])
  assert os.path.getsize(out[:-4] + '.png') > 1000
