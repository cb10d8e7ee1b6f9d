"""Multi-host runs: joining the job, the primary process, barriers, agreeing on when to stop.

`initialize` calls `jax.distributed.initialize` with explicit flags (`--coordinator_address`,
`--num_processes`, `--process_id`, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment) or, with `auto=True`, lets JAX detect the cluster (Cloud TPU VM
metadata, SLURM, Open MPI). CPU processes talk through gloo; a coordinator on a loopback
address is also bound to loopback only, so a local multi-process job never listens on, or
sends to, any other address.

Stopping: every process must save the same step and stop together, or the collective save and
the next step's collectives hang. In a single process SIGTERM / SIGINT set a flag the loop
polls (`jaxformer.train.checkpoint.PreemptionHandler`). In a multi-process job JAX's preemption
service is the agreement: a SIGTERM on any host is propagated by the coordination service, the
processes agree on a step past the current one of every process, and
`multihost_utils.reached_preemption_sync_point(step)` is true at that step on all of them
(Ctrl-C is turned into the same notice). Checkpoint moves and other file-system changes made by
process 0 are followed by a barrier.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

import jax

log = logging.getLogger('jaxformer')

LOOPBACK = ('127.0.0.1', 'localhost', '[::1]', '::1')


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Joins a multi-process job if asked to; returns whether one was joined.

  Explicit values (arguments, then the JAX_* environment) win; `auto` alone asks JAX to
  detect a TPU VM slice or a SLURM / MPI job. Raises ValueError naming the missing values when
  only some of the three are given.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  explicit = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
              'process_id': process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if not auto and not given:
    return False
  if given and len(given) < 3 and not auto:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f'multi-process flags {sorted(given)} were given but {missing} were not: '
                     'pass all three (--coordinator_address, --num_processes, --process_id), or '
                     'use --multihost to detect a TPU VM / SLURM job')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {k: v for k, v in explicit.items() if v is not None}
  if coordinator_address is not None:
    host = coordinator_address.rsplit(':', 1)[0]
    if host in LOOPBACK:
      kwargs['coordinator_bind_address'] = coordinator_address
  jax.distributed.initialize(**kwargs)
  log.info('process %d of %d: %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'jaxformer:{name}')


def process_sum(values):
  """The elementwise sum over processes of each process's uint32 `values` (as int64)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(np.asarray(values, np.uint32), tiled=False)
  return np.asarray(gathered, np.int64).reshape(jax.process_count(), -1).sum(0)


class StopAgreement:
  """Context manager: `should_stop(step)` is true at the same step on every process.

  Single process: SIGTERM / SIGINT set a flag (a second Ctrl-C raises KeyboardInterrupt).
  Several processes: SIGTERM goes to JAX's preemption notifier untouched, SIGINT is forwarded
  to it as SIGTERM, and the agreed step comes from `reached_preemption_sync_point`.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    from jaxformer.train.checkpoint import PreemptionHandler  # pylint: disable=import-outside-toplevel
    self.multi = jax.process_count() > 1
    self._local = None if self.multi else PreemptionHandler(signals)
    self._previous = None
    self._agreed = False
    self.signal_name: str | None = None

  def __enter__(self) -> StopAgreement:
    if self._local is not None:
      self._local.__enter__()
    else:
      self._previous = signal.signal(signal.SIGINT, self._forward)
    return self

  def __exit__(self, *exc) -> None:
    if self._local is not None:
      self._local.__exit__(*exc)
    elif self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)

  def _forward(self, signum, frame) -> None:
    del signum, frame
    log.warning('received SIGINT: asking every process to save and stop')
    os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Call once per step, with the step just completed, on every process."""
    if self._local is not None:
      self.signal_name = self._local.signal_name
      return self._local.should_stop
    if not self._agreed:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self._agreed = bool(multihost_utils.reached_preemption_sync_point(step))
      if self._agreed:
        self.signal_name = 'SIGTERM'
        log.warning('every process agreed to stop at step %d', step)
    return self._agreed
