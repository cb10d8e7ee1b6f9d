"""Shared command-line plumbing for `python -m jaxformer.{train,eval,generate}`."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings


def setup_logging() -> None:
  """Readable INFO logs from jaxformer; quiet third-party chatter (absl, orbax, grain)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  root = logging.getLogger('jaxformer')
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
    root.addHandler(handler)
  root.setLevel(os.environ.get('JAXFORMER_LOG', 'INFO'))
  root.propagate = False
  warnings.filterwarnings('ignore', category=DeprecationWarning)
  for name in ('orbax', 'absl', 'grain', 'jax._src'):
    logging.getLogger(name).setLevel(logging.WARNING)


def load_run_config(workdir: str, config=None):
  """The given config, or the resolved config a run saved in its workdir."""
  if config is not None:
    return config
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: --workdir must be a jaxformer run directory '
                            '(or pass --config)')
  with open(path) as f:
    return json.load(f)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Joins a multi-host job through `jax.distributed.initialize()`.

  With no arguments JAX discovers the coordinator on Cloud TPU VMs and under SLURM / Open MPI;
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (see launch/).
  """
  if not enabled:
    return
  import jax
  kwargs = {}
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)
  logging.getLogger('jaxformer').info('process %d of %d, %d local / %d global devices',
                                      jax.process_index(), jax.process_count(),
                                      jax.local_device_count(), jax.device_count())
