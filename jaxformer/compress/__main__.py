"""python -m jaxformer.compress <command> [flags]

  prune     structured (heads, FFN units) and magnitude pruning of a finished run
            (jaxformer/compress/prune_cli.py)

Each command lives in its own module, which defines its flags and a `cli()`.
"""

import importlib
import sys

COMMANDS = {
    'prune': 'jaxformer.compress.prune_cli',
}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f'usage: python -m jaxformer.compress {{{",".join(COMMANDS)}}} [flags]\n\n'
          + (__doc__ or ''), file=sys.stderr)
    sys.exit(2)
  command = sys.argv.pop(1)
  sys.argv[0] = f'{sys.argv[0]} {command}'
  importlib.import_module(COMMANDS[command]).cli()


if __name__ == '__main__':
  main()
