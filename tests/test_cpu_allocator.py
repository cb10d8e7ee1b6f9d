"""jaxformer/cpu_allocator.py: XLA:CPU's step temporaries reuse memory instead of being mapped
afresh (and page-faulted in) on every step."""

import os
import subprocess
import sys

import pytest

from jaxformer import cpu_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 2-layer quickstart-shaped training step (batch 8 x 256, d 128; experiments/cpu_step_vs_peers
# 'bare'): its temporaries are one block of about 120 MB per step. Prints the median of the
# minor page faults of 5 steps, after 4 warm-up steps: on a loaded machine a step is sometimes
# dispatched before the previous step's block is freed, and the heap grows to hold both (a
# step with faults now and then, under 'reuse'); the median is the steady state.
PROGRAM = """
import resource, statistics, sys
import jaxformer
sys.path.insert(0, 'experiments')
import cpu_step_vs_peers as c
exp = c.experiment(c.parse_args(['--layers', '2']))
step = c.build_bare(exp, c.make_batch(exp), None, c.hyper(exp))
for _ in range(4):
  step()
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def _faults_per_step(choice: str) -> float:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''),
             JAXFORMER_CPU_ALLOCATOR=choice, JAXFORMER_COMPILATION_CACHE='none')
  env.pop('XLA_FLAGS', None)  # one device
  out = subprocess.run([sys.executable, '-c', PROGRAM], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True)
  return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_allocator._libc() is None, reason='needs glibc (mallopt)')
def test_reuse_stops_the_per_step_page_faults():
  system, reuse = _faults_per_step('system'), _faults_per_step('reuse')
  # 'system': the step's temporaries are mapped afresh, >= 80 MB of 4 KiB pages every step.
  assert system > 20_000, system
  # 'reuse' (the default on CPU): the freed block is handed to the next step, already mapped.
  assert reuse < system / 100, (reuse, system)


def test_bad_setting_names_the_variable_and_choices(monkeypatch):
  monkeypatch.setenv(cpu_allocator.ENV, 'fast')
  with pytest.raises(ValueError, match=r"JAXFORMER_CPU_ALLOCATOR='fast' is invalid.*'reuse'"):
    cpu_allocator.apply_at_import()


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert not cpu_allocator.cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert cpu_allocator.cpu_only()
