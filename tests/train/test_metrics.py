"""Metric writer (JSONL, TensorBoard), progress display, FLOP / MFU accounting."""

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.train import metrics
from jaxformer.train.metrics import (MetricWriter, ProgressBar, Throughput, mfu,
                                     model_flops_per_token, peak_flops_per_device, read_metrics,
                                     read_tensorboard_scalars)

LOGS = [
    (10, {'loss': jnp.asarray(2.5), 'lr': np.float32(3e-4), 'tokens': 4096}),
    (20, {'loss': 2.25, 'lr': 2e-4, 'tokens': np.int64(8192)}),
    (30, {'loss': float('nan'), 'lr': 1e-4, 'tokens': 12288}),
]


def test_jsonl_round_trip_and_append(tmp_path):
  with MetricWriter(tmp_path, use_tensorboard=False) as writer:
    for step, scalars in LOGS[:2]:
      writer.write(step, scalars)
  with MetricWriter(tmp_path, use_tensorboard=False) as writer:  # a resumed run appends
    writer.write(*LOGS[2])
  records = read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [10, 20, 30]
  assert records[0] == {'step': 10, 'loss': 2.5, 'lr': float(np.float32(3e-4)), 'tokens': 4096}
  assert records[1] == {'step': 20, 'loss': 2.25, 'lr': 2e-4, 'tokens': 8192}
  assert isinstance(records[1]['tokens'], int)
  assert math.isnan(records[2]['loss'])
  assert not (tmp_path / 'tensorboard').exists()


def test_writer_rejects_non_scalars_and_reserved_step(tmp_path):
  with MetricWriter(tmp_path, use_tensorboard=False) as writer:
    with pytest.raises(ValueError, match='not a scalar'):
      writer.write(1, {'loss': np.ones(3)})
    with pytest.raises(ValueError, match='reserved'):
      writer.write(1, {'step': 3})


def test_disabled_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / 'run', enabled=False) as writer:
    assert writer.write(1, {'loss': jnp.asarray(1.5)}) == {'loss': 1.5}
  assert not (tmp_path / 'run').exists()


def test_crc32c_used_by_the_reader_matches_the_check_value():
  from tensorboardX.crc32c import crc32c
  assert crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C (Castagnoli) check value


def test_tensorboard_events_hold_the_scalars(tmp_path):
  with MetricWriter(tmp_path) as writer:
    for step, scalars in LOGS:
      writer.write(step, scalars)
  scalars = read_tensorboard_scalars(tmp_path / 'tensorboard')
  assert set(scalars) == {'loss', 'lr', 'tokens'}
  assert [s for s, _ in scalars['lr']] == [10, 20, 30]
  np.testing.assert_allclose([v for _, v in scalars['lr']], [3e-4, 2e-4, 1e-4], rtol=1e-6)
  assert [v for _, v in scalars['tokens']] == [4096., 8192., 12288.]
  assert scalars['loss'][:2] == [(10, 2.5), (20, 2.25)] and math.isnan(scalars['loss'][2][1])


def test_event_reader_detects_corruption(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write(1, {'loss': 1.0})
  (path,) = (tmp_path / 'tensorboard').glob('*tfevents*')
  data = bytearray(path.read_bytes())
  data[-6] ^= 0xFF  # a byte inside the last record's payload
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match='CRC'):
    read_tensorboard_scalars(tmp_path / 'tensorboard')
  path.write_bytes(bytes(data[:-3]))
  with pytest.raises(ValueError, match='truncated'):
    read_tensorboard_scalars(tmp_path / 'tensorboard')


def test_flops_per_token_hand_example():
  # GPT-2 small-like: N = 85M non-embedding params, L = 12, D = 768, T = 1024.
  n, layers, d, t = 85_000_000, 12, 768, 1024
  assert model_flops_per_token(n, layers, d, t) == 510_000_000 + 113_246_208
  # Counted by hand for one layer, D = 4, T = 2, one weight matrix D x D (N = 16):
  # weights 6 * 16 = 96; attention per token fwd 2*T*D (QK^T) + 2*T*D (AV) = 32, x3 = 96.
  assert model_flops_per_token(16, 1, 4, 2) == 96 + 96


def test_mfu_and_peak_table():
  assert mfu(1000.0, 6e9, 989e12 * 8) == pytest.approx(1000 * 6e9 / (989e12 * 8))
  assert mfu(1000.0, 6e9, None) is None
  assert peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert peak_flops_per_device('NVIDIA H100 PCIe') == 756e12
  assert peak_flops_per_device('NVIDIA A100-SXM4-40GB') == 312e12
  assert peak_flops_per_device('TPU v4') == 275e12
  assert peak_flops_per_device('TPU v4 lite') is None  # v4i is a different chip
  assert peak_flops_per_device('TPU v5 lite') == 197e12
  assert peak_flops_per_device('TPU v5') == 459e12
  assert peak_flops_per_device('cpu') is None
  assert metrics.PEAK_FLOPS['cpu'] is None


def test_throughput_rates():
  times = iter([100.0, 102.0, 103.0])
  meter = Throughput(tokens_per_step=512, flops_per_token=1e9, peak_flops=1e12,
                     clock=lambda: next(times))
  assert meter(0) == {}
  rates = meter(10)
  assert rates == pytest.approx({'steps_per_s': 5.0, 'tokens_per_s': 2560.0, 'mfu': 2.56})
  assert meter(12) == pytest.approx({'steps_per_s': 2.0, 'tokens_per_s': 1024.0, 'mfu': 1.024})
  cpu = Throughput(tokens_per_step=1, flops_per_token=1e9, peak_flops=None,
                   clock=iter([0.0, 1.0]).__next__)
  cpu(0)
  assert 'mfu' not in cpu(1)


def test_progress_without_tty_prints_a_line_per_log_interval():
  stream = io.StringIO()  # not a TTY
  times = iter([0.0, 10.0, 20.0])
  bar = ProgressBar(1000, stream=stream, clock=lambda: next(times))
  assert not bar.enabled
  bar.update(1)  # no scalars: nothing to print
  bar.update(100, {'loss': jnp.asarray(2.3456), 'lr': 3e-4, 'ignored': 1.0})
  bar.update(200, {'loss': 2.0})
  bar.close()
  lines = stream.getvalue().splitlines()
  assert lines == [
      'step 100/1000 (10.0%) | loss 2.346 | lr 3.000e-04 | 10 steps/s | eta 0:01:30',
      'step 200/1000 (20.0%) | loss 2 | 10 steps/s | eta 0:01:20',
  ]


def test_progress_bar_on_a_tty_shows_step_and_metrics(monkeypatch):
  # The bar also needs a wide enough terminal; shutil reads COLUMNS first, so the test does not
  # depend on the terminal (or its absence) of the machine that runs it.
  monkeypatch.setenv('COLUMNS', '120')

  class Tty(io.StringIO):

    def isatty(self):
      return True

  stream = Tty()
  with ProgressBar(50, stream=stream) as bar:
    assert bar.enabled
    bar.update(10)
    bar.update(20, {'loss': 1.25})
  text = stream.getvalue()
  assert '20/50' in text and 'loss 1.25' in text
  assert ProgressBar(50, stream=Tty(), enabled=False)._bar is None
