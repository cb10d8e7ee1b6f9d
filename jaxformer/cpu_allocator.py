"""Lets XLA:CPU reuse the memory of its temporaries from one step to the next (glibc only).

XLA:CPU allocates an executable's temporaries as one block per run (232 MB for the quickstart's
train step as profiled), from one of its worker threads. glibc serves a block that large from a
fresh `mmap` (a thread's arena cannot hold it) and unmaps it when the run ends, so every step touches
all of it anew: about 60,000 minor page faults per quickstart step (`strace` shows one mmap /
munmap pair of 232 MB per step; `getrusage` counts the faults), a third of the step on the 2-core
reference machine (docs/benchmarks.md).

`reuse_freed_memory()` sets three `mallopt` parameters: one arena (M_ARENA_MAX=1), so that large
blocks come from the main heap; no mmap for large blocks (M_MMAP_MAX=0); and no trimming of the
heap's top (M_TRIM_THRESHOLD at its maximum). A freed step's block is then handed to the next
step as it is, already mapped. The price is that the process keeps its peak heap until it
exits, as PyTorch's caching allocators do on purpose. Allocations made before the call are not
affected; calling it again is harmless.

Threads keep the arena they first allocated from, so the settings only help when made before
XLA starts its thread pools: `import jaxformer` applies them (`apply_at_import`) when JAX will
run on the CPU (JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed) and no backend is running
yet. `JAXFORMER_CPU_ALLOCATOR=system` leaves glibc alone. Other C libraries (musl, macOS) have
no `mallopt` and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os

from jaxformer import xla_guard

log = logging.getLogger(__name__)

CHOICES = ('reuse', 'system')
ENV = 'JAXFORMER_CPU_ALLOCATOR'
ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                       'jax_rocm7_plugin', 'libtpu')
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2 ** 31 - 1
_applied = False


def _libc():
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name or 'libc.so.6')
  except OSError:
    return None
  return libc if hasattr(libc, 'mallopt') and hasattr(libc, 'gnu_get_libc_version') else None


def reuse_freed_memory() -> bool:
  """Applies the three mallopt settings; returns whether they are in effect."""
  global _applied
  if _applied:
    return True
  libc = _libc()
  if libc is None:
    log.info('cpu_allocator: no glibc mallopt here; the system allocator is left as it is')
    return False
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX)))
  _applied = ok
  if not ok:
    log.warning('cpu_allocator: glibc refused a mallopt setting; XLA:CPU temporaries are '
                'mapped afresh each step')
  return ok


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin exists."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms == 'cpu'
  return not any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_PLUGINS)


def apply_at_import() -> bool:
  """Called by `import jaxformer`: reuse freed memory when JAX will run on the CPU only, unless
  JAXFORMER_CPU_ALLOCATOR=system or a JAX backend is already running."""
  choice = os.environ.get(ENV, 'reuse').strip().lower() or 'reuse'
  if choice not in CHOICES:
    raise ValueError(f'{ENV}={choice!r} is invalid: allowed values are {list(CHOICES)}')
  if choice != 'reuse' or not cpu_only() or xla_guard.backend_started():
    return False
  return reuse_freed_memory()

