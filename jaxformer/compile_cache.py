"""JAX's persistent compilation cache for train, eval and generate (`train.compilation_cache`).

Every start of a run compiles its steps again unless the compiled programs are kept on disk;
with the cache a second start of the same config (a resume, an evaluation, a sample) loads them.

  'auto'   (default) what $JAXFORMER_COMPILATION_CACHE says if it is set to something else than
           'auto' ('none' turns it off, or a directory), else $XDG_CACHE_HOME/jaxformer/xla
           (~/.cache/jaxformer/xla)
  'none'   off
  a path   that directory

Every program is cached, however quick its compilation (`jax_persistent_cache_min_*` = 0).
JAX keys an entry by the program, the backend, the compile options and the XLA flags, so a flag
such as the CPU miscompile guard of `jaxformer.xla_guard` gives separate entries. `CacheStats`
counts hits and misses from JAX's own monitoring events, and the trainer logs them.
"""

from __future__ import annotations

import logging
import os
import threading

import jax
import jax.monitoring

log = logging.getLogger(__name__)

ENV = 'JAXFORMER_COMPILATION_CACHE'
_HIT, _MISS = '/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'


def resolve(setting: str) -> str | None:
  """The cache directory a `train.compilation_cache` setting names, or None (off)."""
  setting = (setting or '').strip()
  if setting.lower() in ('', 'none', 'off'):
    return None
  if setting == 'auto':
    env = os.environ.get(ENV, 'auto').strip()
    if env != 'auto':
      return resolve(env)
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'jaxformer', 'xla')
  return os.path.abspath(os.path.expanduser(setting))


class CacheStats:
  """Hits and misses of the persistent cache in this process, from JAX's monitoring events."""

  def __init__(self):
    self.hits = self.misses = 0
    self._lock = threading.Lock()

  def __call__(self, event: str, **kwargs) -> None:
    del kwargs
    if event in (_HIT, _MISS):
      with self._lock:
        if event == _HIT:
          self.hits += 1
        else:
          self.misses += 1


STATS = CacheStats()
_registered = False


def enable(setting: str) -> str | None:
  """Points JAX's persistent compilation cache at the directory `setting` names (or leaves it
  off); -> the directory. Call before the first compilation of the process: JAX decides once
  whether a process uses the cache."""
  global _registered
  directory = resolve(setting)
  if directory is None:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    log.warning('train.compilation_cache: cannot create %s (%s); compiling without a cache',
                directory, e)
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if not _registered:
    jax.monitoring.register_event_listener(STATS)
    _registered = True
  return directory
