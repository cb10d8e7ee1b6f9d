"""The CPU miscompilation canary (jaxformer/xla_guard.py).

XLA:CPU's YNN fusion (on by default from jaxlib 0.10.2) computes
`c * q.sum(-1, keepdims=True) + (q * c).sum(-1, keepdims=True)` off by about 13 for these shapes.
These tests fail whenever a process that imported jaxformer computes it wrong: in this suite's
own process, and in a fresh interpreter that imports jaxformer the way a user does.
"""

import os
import subprocess
import sys
import textwrap

from jaxformer import xla_guard

CANARY = textwrap.dedent('''
    import numpy as np
    import jax
    q = np.random.RandomState(0).randn(4, 12, 4).astype(np.float32)
    c = np.random.RandomState(1).randn(192, 4, 12, 4).astype(np.float32)
    out = np.asarray(jax.jit(lambda c: c * q.sum(-1, keepdims=True)
                             + (q * c).sum(-1, keepdims=True))(c))
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    ref = c64 * q64.sum(-1, keepdims=True) + (q64 * c64).sum(-1, keepdims=True)
    error = float(np.abs(out - ref).max())
''')


def canary_error() -> float:
  scope = {}
  exec(CANARY, scope)  # pylint: disable=exec-used
  return scope['error']


def run_python(code: str, env=None):
  full_env = {k: v for k, v in os.environ.items()
              if k not in ('XLA_FLAGS', xla_guard.OPT_OUT)}
  full_env.update(env or {}, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env=full_env, timeout=300, check=True)


def test_this_process_computes_the_canary_right():
  assert canary_error() < 1e-5


def test_a_fresh_process_importing_jaxformer_computes_the_canary_right():
  out = run_python('import jaxformer\n' + CANARY + 'print(error)')
  assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_the_guard_applies_from_the_first_bad_release_on():
  assert not xla_guard.needs_guard('0.10.1')
  assert xla_guard.needs_guard('0.10.2')
  assert xla_guard.needs_guard('0.11.0')
  if xla_guard.needs_guard():
    assert xla_guard.FLAG in os.environ.get('XLA_FLAGS', '')


def test_importing_jaxformer_after_the_backend_started_warns():
  if not xla_guard.needs_guard():
    return
  out = run_python('import warnings, jax\njax.devices()\n'
                   'with warnings.catch_warnings(record=True) as w:\n'
                   '  warnings.simplefilter("always")\n'
                   '  import jaxformer\n'
                   'print([str(x.message) for x in w])')
  assert 'YNN fusion stays on' in out.stdout
