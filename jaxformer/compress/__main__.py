"""python -m jaxformer.compress COMMAND --flags...

Commands on a finished run, each writing a new run folder that `jaxformer.eval` and
`jaxformer.generate` read (each module's docstring gives its flags):
  quantize   post-training weight quantization (jaxformer/compress/ptq.py)
  prune      structured (heads, FFN units) and magnitude pruning (jaxformer/compress/prune_cli.py)
"""

import functools
import importlib
import sys

COMMANDS = {'quantize': 'jaxformer.compress.ptq', 'prune': 'jaxformer.compress.prune_cli'}


def cli() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    got = sys.argv[1] if len(sys.argv) > 1 else None
    print(f'error: the command {got!r} is invalid: allowed commands are {sorted(COMMANDS)}\n'
          f'{__doc__}', file=sys.stderr)
    sys.exit(2)
  command = sys.argv.pop(1)
  sys.argv[0] = f'{sys.argv[0]} {command}'
  module = importlib.import_module(COMMANDS[command])
  from jaxformer.cli import run  # pylint: disable=import-outside-toplevel
  run(functools.partial(module.main, flag_values=module.define_flags()))


if __name__ == '__main__':
  cli()
