"""Training metrics: JSONL + TensorBoard writer, progress display, throughput and MFU.

FLOP accounting follows PaLM (Chowdhery et al., 2022, appendix B). Per token, a training step
(forward + backward = 3x forward) costs

    6 N + 12 L D T

where N is the number of non-embedding parameters (each weight does one multiply-add forward,
2 FLOPs, and two in the backward pass), and 12 L D T is self-attention: per layer the score
matrix Q K^T and the weighted sum A V each take 2 T D FLOPs per query token forward, so
4 L D T forward and 12 L D T for training (D = heads x head dim; T is the full sequence length;
the causal mask is not discounted, as in PaLM). Embedding lookups are not matmuls; an untied
output projection is a matmul and belongs in N if it should count. Rematerialisation does not
change this *model* FLOP count, which is why MFU (not hardware FLOP utilisation) is reported:

    MFU = tokens/s x FLOPs/token / peak FLOP/s.

TensorBoard event files are written with tensorboardX (no TensorFlow); `read_tensorboard_scalars`
reads them back by parsing the TFRecord framing (length, masked CRC-32C, payload, CRC) and the
`Event` protobuf, checking both CRCs.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import numpy as np
from etils import epath

from jaxformer.train.workdir import is_remote

# Dense bf16 peak FLOP/s per chip (vendor data sheets; sparsity not counted).
PEAK_FLOPS: dict[str, float | None] = {
    'H100': 989e12,  # SXM
    'H100 PCIe': 756e12,
    'H200': 989e12,
    'A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6e': 918e12,
    'cpu': None,
}

# `jax.Device.device_kind` strings for the TPU entries; GPUs are matched by substring.
_TPU_KINDS = {
    'TPU v4': 'TPU v4',
    'TPU v5 lite': 'TPU v5e',
    'TPU v5e': 'TPU v5e',
    'TPU v5': 'TPU v5p',
    'TPU v5p': 'TPU v5p',
    'TPU v6 lite': 'TPU v6e',
    'TPU v6e': 'TPU v6e',
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device from its `jax.Device.device_kind`; None when unknown/CPU."""
  if device_kind in _TPU_KINDS:
    return PEAK_FLOPS[_TPU_KINDS[device_kind]]
  kind = device_kind.upper()
  for name in ('H100 PCIE', 'H100', 'H200', 'A100'):
    if name in kind:
      return PEAK_FLOPS['H100 PCIe' if name == 'H100 PCIE' else name]
  return None


def model_flops_per_token(num_params_non_embedding: int, num_layers: int, d_model: int,
                          seq_len: int) -> int:
  """Training FLOPs per token, 6 N + 12 L D T (PaLM appendix B; see the module docstring)."""
  return 6 * num_params_non_embedding + 12 * num_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
  """Model FLOP utilisation in [0, 1]; None when the peak is unknown (CPU: reported as n/a).

  `peak_flops` is the total over all devices doing the work (per-device peak x device count).
  """
  if peak_flops is None or peak_flops <= 0:
    return None
  return tokens_per_s * flops_per_token / peak_flops


class Throughput:
  """Rates between successive calls: steps/s, tokens/s and MFU.

  Call it after blocking on a step's result (e.g. after `float(loss)`), otherwise asynchronous
  dispatch makes the time meaningless. The first call only starts the clock. Every step is
  `tokens_per_step` tokens of `flops_per_token` FLOPs each, unless `work(step)` gives the
  (tokens, FLOPs or None) of the first `step` steps, for runs whose steps differ (a
  sequence-length curriculum).
  """

  def __init__(self, *, tokens_per_step: int = 0, flops_per_token: float | None = None,
               peak_flops: float | None = None, clock=time.perf_counter,
               work: Callable[[int], tuple[float, float | None]] | None = None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._work = work or self._constant_work
    self._clock = clock
    self._last: tuple[int, float] | None = None

  def _constant_work(self, step: int) -> tuple[float, float | None]:
    tokens = step * self.tokens_per_step
    return tokens, None if self.flops_per_token is None else tokens * self.flops_per_token

  def __call__(self, step: int) -> dict[str, float]:
    now = self._clock()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0] or now <= last[1]:
      return {}
    seconds = now - last[1]
    (tokens0, flops0), (tokens1, flops1) = self._work(last[0]), self._work(step)
    out = {'steps_per_s': (step - last[0]) / seconds,
           'tokens_per_s': (tokens1 - tokens0) / seconds}
    if flops1 is not None:
      value = mfu((flops1 - flops0) / seconds, 1.0, self.peak_flops)
      if value is not None:
        out['mfu'] = value
    return out


def _scalar(value) -> float | int:
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'metric of shape {value.shape} is not a scalar')
  item = value.reshape(()).item()
  return item if isinstance(item, int) and not isinstance(item, bool) else float(item)


class MetricWriter:
  """Writes one JSON object per logged step to `<workdir>/metrics.jsonl` and TensorBoard events
  to `<workdir>/tensorboard`.

  Values are converted to Python scalars on the host (this blocks on device arrays; log every
  few steps, not every step). Only process 0 writes in a multi-host run. NaN and Inf are kept
  as the JSON extensions NaN/Infinity that Python's json module reads back.
  """

  def __init__(self, workdir, *, use_tensorboard: bool = True, enabled: bool | None = None,
               resume_step: int | None = None):
    if enabled is None:
      import jax  # pylint: disable=import-outside-toplevel
      enabled = jax.process_index() == 0
    self.enabled = enabled
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.tensorboard_dir = epath.Path(workdir) / 'tensorboard'
    self._file = None
    self._tb = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
      drop_after(self.path, resume_step)
    self._file = _JsonLines(self.path)
    if use_tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(logdir=str(self.tensorboard_dir), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float | int]:
    """Logs `scalars` at `step`; returns them as Python numbers."""
    if 'step' in scalars:
      raise ValueError("'step' is reserved for the step number")
    values = {name: _scalar(v) for name, v in scalars.items()}
    if not self.enabled:
      return values
    self._file.append(json.dumps({'step': int(step), **values}))
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=int(step))
    return values

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def drop_after(path, step: int) -> int:
  """Removes the records of steps after `step` from a metrics file (written atomically).

  A run that resumes from a checkpoint at `step` logs the later steps again; without this the
  file would hold each of them twice. Returns the number of lines dropped.
  """
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text(encoding='utf-8').splitlines()
  kept = [line for line in lines if line.strip() and json.loads(line).get('step', 0) <= step]
  if len(kept) != len([line for line in lines if line.strip()]):
    from jaxformer.train.workdir import write_text  # pylint: disable=import-outside-toplevel
    write_text(path, ''.join(line + '\n' for line in kept))
  return len(lines) - len(kept)


class _JsonLines:
  """Appends lines to a local file; on an object store (gs://), which cannot append, keeps the
  lines and rewrites the object after each one (metrics files are small)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.local = not is_remote(path)
    if self.local:
      self._file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    else:
      self._lines = path.read_text().splitlines() if path.exists() else []

  def append(self, line: str) -> None:
    if self.local:
      self._file.write(line + '\n')
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text('\n'.join(self._lines) + '\n')

  def close(self) -> None:
    if self.local:
      self._file.close()


def read_metrics(path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file, in order (one per logged step: a resumed run first
  drops the records past the step it resumes from)."""
  text = epath.Path(path).read_text(encoding='utf-8')
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _masked_crc32c(data: bytes) -> int:
  from tensorboardX.crc32c import crc32c  # pylint: disable=import-outside-toplevel
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """Scalars of every event file under `logdir`: tag -> [(step, value), ...] in file order.

  Raises ValueError on a truncated record or a CRC mismatch.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(pathlib.Path(logdir).rglob('*tfevents*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      if offset + 12 > len(data):
        raise ValueError(f'{path}: truncated record header at byte {offset}')
      header = data[offset:offset + 8]
      (length,) = struct.unpack('<Q', header)
      (length_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
      if length_crc != _masked_crc32c(header):
        raise ValueError(f'{path}: bad length CRC at byte {offset}')
      start, end = offset + 12, offset + 12 + length
      if end + 4 > len(data):
        raise ValueError(f'{path}: truncated record at byte {offset}')
      payload = data[start:end]
      (payload_crc,) = struct.unpack('<I', data[end:end + 4])
      if payload_crc != _masked_crc32c(payload):
        raise ValueError(f'{path}: bad payload CRC at byte {offset}')
      offset = end + 4
      event = event_pb2.Event.FromString(payload)
      if not event.HasField('summary'):
        continue
      for value in event.summary.value:
        if value.HasField('simple_value'):
          number = value.simple_value
        elif value.HasField('tensor') and value.tensor.float_val:
          number = value.tensor.float_val[0]
        else:
          continue
        scalars.setdefault(value.tag, []).append((int(event.step), float(number)))
  return scalars


def format_number(value: float) -> str:
  """Short human form: 4 significant digits, scientific outside [1e-3, 1e5)."""
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if value != value or math.isinf(value) or value == 0:
    return str(value)
  if 1e-3 <= abs(value) < 1e5:
    return f'{value:.4g}'
  return f'{value:.3e}'


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


MIN_BAR_COLUMNS = 40


class ProgressBar:
  """A tqdm bar showing the step and a few metrics, or plain log lines where it cannot draw.

  `update(step)` advances the bar; `update(step, scalars)` (at each log interval) also shows
  the metrics named in `keys`. Without a TTY (CI, log files) or with `enabled=False` (tests) no
  bar is drawn and each `update` that carries scalars prints one line instead:

      step 200/1000 (20.0%) | loss 2.345 | lr 3.000e-04 | 12.5 steps/s | eta 0:01:04
  """

  def __init__(self, total_steps: int, *, initial_step: int = 0,
               keys: tuple[str, ...] = ('loss', 'lr', 'tokens_per_s', 'mfu'),
               enabled: bool | None = None, stream: TextIO | None = None,
               clock=time.perf_counter, silent: bool = False):
    self.total_steps = total_steps
    self.silent = silent  # other processes of a multi-host run print nothing
    self.keys = keys
    self.stream = stream if stream is not None else sys.stderr
    if enabled is None:
      # A bar needs a terminal wide enough to draw it; elsewhere (pipes, log files, a terminal
      # reporting 0 columns) each logged step is one plain line.
      enabled = (hasattr(self.stream, 'isatty') and self.stream.isatty()
                 and shutil.get_terminal_size((0, 0)).columns >= MIN_BAR_COLUMNS)
    self.enabled = enabled
    self._clock = clock
    self._last = (initial_step, clock())
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=initial_step, file=self.stream,
                       dynamic_ncols=True, unit='step')

  def _shown(self, scalars: Mapping[str, Any]) -> list[str]:
    return [f'{k} {format_number(_scalar(scalars[k]))}' for k in self.keys if k in scalars]

  def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if scalars:
        self._bar.set_postfix_str(' | '.join(self._shown(scalars)), refresh=True)
      return
    if not scalars or self.silent:
      return
    now = self._clock()
    parts = [f'step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.1f}%)']
    parts += self._shown(scalars)
    last_step, last_time = self._last
    if step > last_step and now > last_time:
      rate = (step - last_step) / (now - last_time)
      parts.append(f'{format_number(rate)} steps/s')
      parts.append(f'eta {_duration(max(self.total_steps - step, 0) / rate)}')
    self._last = (step, now)
    print(' | '.join(parts), file=self.stream, flush=True)

  def write(self, message: str) -> None:
    """A line above the bar (or a plain line when no bar is drawn)."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    elif not self.silent:
      print(message, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
