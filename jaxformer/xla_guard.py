"""Keeps XLA's CPU "YNN fusion" off: jaxlib 0.10.2 and later miscompile with it.

jaxlib 0.10.2 turned on XLA:CPU's YNNPACK fusion pass by default. It computes wrong numbers
without any error: `jit(lambda c: c * q.sum(-1, keepdims=True) + (q * c).sum(-1, keepdims=True))`
with q [4, 12, 4] and c [192, 4, 12, 4] is off by about 13 (jax-ml/jax#39103 reports the same
class of bug for a vmapped matrix-vector product followed by a reduction), and it crashes or hangs
on rank-7/8 broadcast-multiply-reduce programs (jax-ml/jax#39257, #40412; still in 0.11.0). In
jaxformer it leaked gradients between batch rows of the LSH attention kind under jit.

The fix is XLA's own switch, `--xla_cpu_experimental_ynn_fusion_type=` (empty: no op is fused
into YNNPACK), appended to `XLA_FLAGS` when jaxformer is imported. A version pin was the other
choice; it was rejected because the crash shipped again in 0.11.0, so a pin would have to chase
every release, and because the flag removes exactly the faulty pass and nothing else. XLA reads
`XLA_FLAGS` once, when the first backend starts, so the flag only takes effect if jaxformer is
imported before anything runs on a device; `disable_ynn_fusion` warns when it comes too late.

`JAXFORMER_ALLOW_YNN_FUSION=1`, or any explicit `--xla_cpu_experimental_ynn_fusion_type=...` in
`XLA_FLAGS`, leaves the choice to the user. Older jaxlib releases (< 0.10.2) are left alone: they
do not fuse into YNNPACK by default, and XLA aborts on flags it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
FIRST_BAD = (0, 10, 2)
OPT_OUT = 'JAXFORMER_ALLOW_YNN_FUSION'


def _version(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split('.')[:3]:
    digits = ''.join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def backend_started() -> bool:
  """Whether a JAX backend is running (XLA has read its flags and started its threads)."""
  if 'jax' not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(getattr(xla_bridge, '_backends', None))


def needs_guard(jaxlib_version: str | None = None) -> bool:
  """Whether this jaxlib fuses into YNNPACK by default (0.10.2 and later)."""
  if jaxlib_version is None:
    try:
      jaxlib_version = importlib.metadata.version('jaxlib')
    except importlib.metadata.PackageNotFoundError:
      return False
  return _version(jaxlib_version) >= FIRST_BAD


def disable_ynn_fusion() -> bool:
  """Appends the flag to XLA_FLAGS unless the user decided otherwise; returns whether it is set.

  Idempotent. Warns (RuntimeWarning) when a JAX backend is already running, since XLA has read
  its flags by then and the miscompilation stays possible in this process.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG in flags:
    return True
  if os.environ.get(OPT_OUT) or not needs_guard():
    return False
  if backend_started():
    warnings.warn(
        'jaxformer was imported after JAX started its backend, so XLA:CPU YNN fusion stays on '
        'in this process; with jaxlib >= 0.10.2 it computes some reductions wrong '
        f'(jax-ml/jax#39103). Import jaxformer before using JAX, or set XLA_FLAGS="{FLAG}=".',
        RuntimeWarning, stacklevel=3)
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}='.strip()
  return True
