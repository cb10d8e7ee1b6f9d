"""The run's work directory: checked for writes before any compute, and its records.

`prepare_workdir` fails in the first second of a run, with the path, the OS error and what to
do, instead of after hours of training at the first checkpoint. Paths are `etils.epath` paths:
a local folder, or an object-store URL such as `gs://bucket/run` (kept as a URL, never turned
into a local path) that every host of a multi-host job writes to. The records written next to
the checkpoints let a reader tell what produced them:

  config.json  the resolved config as JSON (sorted keys; `config_hash` hashes this form)
  config.txt   the config's repr (the YAML-like dump of a ConfigDict, a dataclass's repr)
  params.txt   `param_summary` of the model state: path, shape, dtype, count, total
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from jaxformer.train.checkpoint import flatten


class WorkdirError(RuntimeError):
  """The work directory cannot be created or written."""


class WorkdirLockedError(WorkdirError):
  """Another live process is writing to this work directory."""


LOCK_FILE = '.lock'


class WorkdirLock:
  """An exclusive lock on a run folder, held while a run writes to it.

  `<workdir>/.lock` is locked with `fcntl.flock` and holds a line naming the holder (pid, host,
  start time, command). The kernel drops the lock when its process dies, however it dies, so a
  stale file left by a killed run never blocks a resume; a second live writer is refused with
  the holder's line. Object stores (gs://) have no locks: there the lock is a no-op (multi-host
  jobs take it on process 0 only).
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    if is_remote(self.path) or self._fd is not None:
      return self
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'an unknown process'
      os.close(fd)
      raise WorkdirLockedError(
          f'{self.path.parent} is in use by another run ({holder}): two writers would mix their '
          'checkpoints and metrics. Wait for it to finish or stop it, or choose another '
          '--workdir.') from None
    line = (f'pid {os.getpid()} on {socket.gethostname()}, since '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {" ".join(sys.argv)[:300]}\n')
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


REMOTE_PREFIXES = ('gs://', 's3://')


def is_remote(path) -> bool:
  """Whether `path` is on an object store (no append, no atomic rename of folders)."""
  return str(path).startswith(REMOTE_PREFIXES)


def as_path(path) -> epath.Path:
  """An epath.Path: object-store URLs as they are, local paths made absolute."""
  if is_remote(path):
    return epath.Path(str(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_text(path, text: str) -> None:
  """Writes via a temporary file and a rename, so readers never see half a file (an object
  store writes an object whole by itself)."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f'.{path.name}.tmp.{os.getpid()}')
  tmp.write_text(text)
  tmp.replace(path)


def prepare_workdir(path) -> epath.Path:
  """Creates `path` (and parents) and proves it writable by writing and deleting a probe file.

  Returns the absolute path (an object-store URL unchanged). Raises `WorkdirError` naming the
  path and the OS error.
  """
  path = as_path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe.{socket.gethostname()}.{os.getpid()}'
    probe.write_bytes(b'probe')
    probe.unlink()
  except OSError as error:
    raise WorkdirError(f'cannot write to {path}: {error}; choose another --workdir or fix '
                       'permissions') from error
  return path


def to_plain(config) -> Any:
  """JSON-ready nested dicts/lists from a ConfigDict, a (nested) dataclass or a mapping."""
  if hasattr(config, 'to_dict') and callable(config.to_dict):  # ml_collections.ConfigDict
    config = config.to_dict()
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, Mapping):
    return {str(k): to_plain(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [to_plain(v) for v in config]
  if config is None or isinstance(config, (bool, int, float, str)):
    return config
  if isinstance(config, np.generic):
    return config.item()
  try:
    dtype = np.dtype(config)  # dtypes and scalar types such as jnp.bfloat16
  except TypeError:
    dtype = None
  return dtype.name if dtype is not None and dtype.kind != 'O' else repr(config)


def config_hash(config) -> str:
  """A short, stable fingerprint of the resolved config (16 hex digits of SHA-256)."""
  text = json.dumps(to_plain(config), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_config(workdir, config) -> epath.Path:
  """Writes config.json and config.txt into `workdir`; returns the path of config.json."""
  workdir = epath.Path(workdir)
  path = workdir / 'config.json'
  write_text(path, json.dumps(to_plain(config), indent=2, sort_keys=True) + '\n')
  write_text(workdir / 'config.txt', repr(config) + '\n')
  return path


def _human_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def param_summary(state) -> str:
  """A table of every array in `state` (arrays or abstract shapes): path, shape, dtype, count.

  The last line gives the total count and memory. Paths are '/'-joined tree keys.
  """
  rows = []
  total = total_bytes = 0
  for name, leaf in flatten(state).items():
    shape = tuple(getattr(leaf, 'shape', np.shape(leaf)))
    dtype = getattr(leaf, 'dtype', np.asarray(leaf).dtype)
    count = int(np.prod(shape, dtype=np.int64))
    total += count
    try:
      total_bytes += count * np.dtype(dtype).itemsize
    except TypeError:  # PRNG key dtypes have no numpy itemsize
      pass
    rows.append((name, str(shape), str(dtype), f'{count:,}'))
  header = ('path', 'shape', 'dtype', 'count')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

  def line(row):
    return '  '.join(
        cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))

  lines = [line(header), line(tuple('-' * w for w in widths))]
  lines += [line(r) for r in rows]
  lines.append(f'total: {total:,} parameters in {len(rows)} arrays ({_human_bytes(total_bytes)})')
  return '\n'.join(lines)


def save_param_summary(workdir, state) -> epath.Path:
  """Writes `param_summary(state)` to params.txt in `workdir`; returns its path."""
  path = epath.Path(workdir) / 'params.txt'
  write_text(path, param_summary(state) + '\n')
  return path
