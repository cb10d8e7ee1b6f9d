"""Makes launch/ importable (`import common, local, tpu_vm, slurm`) and runs the launchers.

The launchers are scripts, not part of the jaxformer package; their folder goes on sys.path the
way `python launch/X.py` puts it there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch'
if str(LAUNCH) not in sys.path:
  sys.path.insert(0, str(LAUNCH))

# Variables the launchers read; a test sets the ones it wants.
_CLEARED = ('JAXFORMER_REPO', 'JAXFORMER_REF', 'JAXFORMER_VENV', 'XLA_FLAGS')


@pytest.fixture
def launch():
  """launch('tpu_vm', *args, env={...}) -> CompletedProcess of `python launch/tpu_vm.py args`."""
  def run(name, *args, env=None, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(LAUNCH / f'{name}.py'), *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=60)
  return run
