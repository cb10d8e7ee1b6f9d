"""Shared command-line plumbing for `python -m jaxformer.{train,eval,generate,parallel.plan}`.

`run(main)` is how every command starts: it checks the config file's argument and every
`--config.a.b=v` override before absl parses them, and turns the errors jaxformer raises on
purpose for bad input (`user_errors()`: invalid configs, unwritable or locked workdirs,
incompatible or unreadable checkpoints, missing data, ...) into one line on stderr and exit
status 2. Anything else is a bug and keeps its traceback; `--debug` (or JAXFORMER_DEBUG=1) keeps
the traceback for every error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that report bad input (their message says what to do), not bugs."""
  from jaxformer.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxformer.data.sources import DataUnavailableError  # pylint: disable=import-outside-toplevel
  from jaxformer.train import checkpoint  # pylint: disable=import-outside-toplevel
  from jaxformer.train import workdir  # pylint: disable=import-outside-toplevel
  from jaxformer.train.trainer import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  return (ConfigError, DataUnavailableError, checkpoint.CheckpointError,
          checkpoint.IncompatibleCheckpointError, checkpoint.DataStateError,
          workdir.WorkdirError, NonFiniteLossError, FileNotFoundError)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_overrides(argv: list[str], flag: str = 'config') -> None:
  """Loads `--config=file[:arg]` and checks that every `--config.a.b=v` names a field.

  Raises ConfigError (or the config file's own error for a bad argument) naming the override
  and the fields that exist, before absl would fail on them with a traceback.
  """
  spec = _flag_value(argv, flag)
  if spec is None:
    return
  from jaxformer.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxformer.train.experiment import load_config  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(':')
  config = load_config(path, arg or None)
  for word in argv:
    if not word.startswith(f'--{flag}.'):
      continue
    dotted = word[len(flag) + 3:].split('=', 1)[0]
    node, seen = config, flag
    for part in dotted.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        raise ConfigError(f'--{flag}.{dotted} is invalid: {seen} has no field {part!r}; its '
                          f'fields are {sorted(keys)}' if keys else
                          f'--{flag}.{dotted} is invalid: {seen} is a value, not a section')
      node, seen = node[part], f'{seen}.{part}'


def run(main) -> None:
  """absl's `app.run(main)` with the checks and the error reporting of the module docstring."""
  from absl import app  # pylint: disable=import-outside-toplevel
  debug = '--debug' in sys.argv or bool(os.environ.get('JAXFORMER_DEBUG'))
  argv = [a for a in sys.argv if a != '--debug']
  try:
    check_config_overrides(argv)
    app.run(main, argv=argv)
  except user_errors() as error:  # pylint: disable=catching-non-exception
    if debug:
      raise
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(2)


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


def define_mesh_flags():
  """--mesh / --dcn_mesh: evaluate or sample a run on another device layout than it trained on."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  return {
      'mesh': flags.DEFINE_string(
          'mesh', None, "Mesh axis sizes replacing the run's parallel.mesh, e.g. 'fsdp=8' or "
          "'data=1' (one device); unnamed axes are 1, data takes the rest unless set."),
      'dcn_mesh': flags.DEFINE_string('dcn_mesh', None,
                                      "Likewise for parallel.dcn_mesh (default with --mesh: "
                                      'none).'),
  }


def parse_sizes(flag: str, text: str) -> dict[str, int]:
  """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2}; raises ConfigError naming the flag."""
  from jaxformer.config import ConfigError  # pylint: disable=import-outside-toplevel
  sizes = {}
  for item in filter(None, (t.strip() for t in text.split(','))):
    name, sep, value = item.partition('=')
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      sep = ''
    if not sep:
      raise ConfigError(f'--{flag}={text!r} is invalid: expected axis=size pairs separated by '
                        "commas, e.g. 'fsdp=4,tensor=2'")
  return sizes


def with_mesh(config, flag_values):
  """`config` (a mapping) with parallel.mesh / dcn_mesh replaced per `define_mesh_flags`."""
  mesh, dcn = flag_values['mesh'].value, flag_values['dcn_mesh'].value
  if mesh is None and dcn is None:
    return config
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  parallel = dict(config.get('parallel', {}))
  if mesh is not None:
    parallel['mesh'] = parse_sizes('mesh', mesh)
    parallel['dcn_mesh'] = {}
  if dcn is not None:
    parallel['dcn_mesh'] = parse_sizes('dcn_mesh', dcn)
  config['parallel'] = parallel
  return config


def load_run_config(workdir: str, config=None):
  """The given config, or the resolved config a run saved in its workdir."""
  if config is not None:
    return config
  from jaxformer.train.workdir import as_path  # pylint: disable=import-outside-toplevel
  path = as_path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: --workdir must be a jaxformer run directory '
                            '(or pass --config)')
  return json.loads(path.read_text())


def define_distributed_flags():
  """--multihost and the explicit --coordinator_address / --num_processes / --process_id."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  return {
      'multihost': flags.DEFINE_bool(
          'multihost', False, 'Join a multi-host job with jax.distributed.initialize(), '
          'detecting a Cloud TPU VM slice or a SLURM / MPI job.'),
      'coordinator_address': flags.DEFINE_string(
          'coordinator_address', None, 'HOST:PORT of process 0 (with --num_processes and '
          '--process_id; or JAX_COORDINATOR_ADDRESS).'),
      'num_processes': flags.DEFINE_integer('num_processes', None,
                                            'Number of processes in the job.'),
      'process_id': flags.DEFINE_integer('process_id', None, 'This process, 0-based.'),
  }


def initialize_distributed(flag_values) -> None:
  """Joins a multi-host job per the flags of `define_distributed_flags` (or the JAX_*
  environment); logging from processes other than 0 is reduced to warnings."""
  from jaxformer.parallel import distributed  # pylint: disable=import-outside-toplevel
  joined = distributed.initialize(
      coordinator_address=flag_values['coordinator_address'].value,
      num_processes=flag_values['num_processes'].value,
      process_id=flag_values['process_id'].value, auto=flag_values['multihost'].value)
  if joined and not distributed.is_primary():
    logging.getLogger('jaxformer').setLevel(logging.WARNING)


# -------------------------------------------------------------------- commands on a finished run
def define_run_command_flags(workdir_help: str = 'The run directory.') -> dict[str, Any]:
  """The flags every command that reads a finished run and writes a new folder shares:
  --config (default: the run's own), --workdir, --out, the distributed flags and --mesh."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  return {
      'config': config_flags.DEFINE_config_file('config', None,
                                                "Config file; default: the run's own."),
      'workdir': flags.DEFINE_string('workdir', None, workdir_help, required=True),
      'out': flags.DEFINE_string('out', None, 'The folder to write.', required=True),
      'distributed': define_distributed_flags(),
      'mesh': define_mesh_flags(),
  }


def on_finished_run(flag_values, fn):
  """fn(trainer) on the newest checkpoint of --workdir, restored read-only
  (`Trainer(mode='eval')`) on the layout --mesh asks for; the run folder is released after."""
  from jaxformer.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  f = flag_values
  setup_logging()
  initialize_distributed(f['distributed'])
  config = with_mesh(load_run_config(f['workdir'].value, f['config'].value), f['mesh'])
  trainer = Trainer(config, f['workdir'].value, mode='eval')
  try:
    return fn(trainer)
  finally:
    trainer.close()
