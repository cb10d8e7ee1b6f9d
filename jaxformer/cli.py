"""Shared command-line plumbing for `python -m jaxformer.{train,eval,generate}`."""

from __future__ import annotations

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
