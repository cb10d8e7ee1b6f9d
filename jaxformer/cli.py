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
