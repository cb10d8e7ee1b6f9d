"""What the launchers share: shell quoting, the train command, and a runner with --dry-run.

Every launcher (local.py, tpu_vm.py, slurm.py) turns its flags into a list of `Command`s and
hands them to `run`. With --dry-run they are printed, one per line and quoted so that each line
can be pasted into a shell, and nothing is started; without it each is printed (to stderr, with a
'+ ' prefix) and run with `subprocess.run(check=True)`. Building the commands apart from running
them is what lets the tests check, without gcloud or SLURM, the exact commands a launch would run.

The train command is the same on every host (`train_command`); commands that a remote shell
runs are built as word lists and joined with `join`, so train overrides with spaces, quotes or
`$` reach `python -m jaxformer.train` unchanged. Words the remote shell must expand
(`$SLURM_PROCID`) are marked with `ShellExpr`.

The launchers use the standard library only: they run on laptops and cluster login nodes where
jaxformer is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Iterable, NoReturn, Sequence

REPO_ENV = 'JAXFORMER_REPO'
REF_ENV = 'JAXFORMER_REF'
TRAIN_MODULE = 'jaxformer.train'
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


class ShellExpr(str):
  """A command word the shell expands (e.g. '$SLURM_PROCID'): `join` double-quotes it."""


def quote(word: str) -> str:
  """Quotes one word for a POSIX shell; a `ShellExpr` keeps its `$...` expansions live."""
  if isinstance(word, ShellExpr):
    return '"' + re.sub(r'([\\"`])', r'\\\1', word) + '"'
  return shlex.quote(word)


def join(words: Iterable[str]) -> str:
  """`shlex.join` that leaves the expansions of `ShellExpr` words to the shell."""
  return ' '.join(quote(word) for word in words)


def _flag(name: str, value) -> str:
  text = f'--{name}={value}'
  return ShellExpr(text) if isinstance(value, ShellExpr) else text


def train_command(config: str, workdir: str, overrides: Sequence[str] = (), *,
                  python: str = 'python', multihost: bool = False,
                  coordinator_address: str | None = None, num_processes=None,
                  process_id=None) -> list[str]:
  """`python -m jaxformer.train --config --workdir [distributed flags] [overrides]`.

  Either `multihost` (jax.distributed.initialize() finds the hosts itself) or the explicit
  coordinator_address / num_processes / process_id (all three), or neither for one process.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError('coordinator_address, num_processes and process_id go together')
  if multihost and coordinator_address is not None:
    raise ValueError('multihost and an explicit coordinator exclude each other')
  words = [python, '-m', TRAIN_MODULE, f'--config={config}', f'--workdir={workdir}']
  if multihost:
    words.append('--multihost')
  if coordinator_address is not None:
    words += [_flag('coordinator_address', coordinator_address),
              _flag('num_processes', num_processes), _flag('process_id', process_id)]
  return words + list(overrides)


def with_device_count(xla_flags: str | None, count: int) -> str:
  """XLA_FLAGS with `--xla_force_host_platform_device_count=count` (replacing an earlier one)."""
  kept = [flag for flag in (xla_flags or '').split()
          if flag.split('=', 1)[0] != DEVICE_COUNT_FLAG]
  return ' '.join(kept + [f'{DEVICE_COUNT_FLAG}={count}'])


@dataclasses.dataclass(frozen=True)
class Command:
  """A command line, the environment variables it adds, and the folder it runs in."""
  argv: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()
  cwd: str | None = None

  @classmethod
  def of(cls, argv: Sequence[str], env: dict[str, str] | None = None,
         cwd: str | None = None) -> 'Command':
    return cls(tuple(argv), tuple((env or {}).items()), cwd)

  def __str__(self) -> str:
    """The shell line: `cd DIR && NAME=value ... argv`, ready to paste."""
    line = ' '.join([f'{name}={shlex.quote(value)}' for name, value in self.env] +
                    [join(self.argv)])
    return f'cd {shlex.quote(self.cwd)} && {line}' if self.cwd else line

  def environ(self) -> dict[str, str] | None:
    """The full environment for subprocess (None: inherit this one unchanged)."""
    return {**os.environ, **dict(self.env)} if self.env else None


def announce(command: Command) -> None:
  print(f'+ {command}', file=sys.stderr, flush=True)


def run(commands: Sequence[Command], dry_run: bool) -> None:
  """Prints the commands (--dry-run), or prints and runs each in turn, stopping at a failure."""
  for command in commands:
    if dry_run:
      print(command, flush=True)
    else:
      announce(command)
      subprocess.run(list(command.argv), check=True, env=command.environ(), cwd=command.cwd)


def prog() -> str:
  return os.path.basename(sys.argv[0]) or 'launch'


def warn(message: str) -> None:
  print(f'{prog()}: warning: {message}', file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> NoReturn:
  """Exits with a one-line error (no traceback)."""
  print(f'{prog()}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def repo_and_ref(repo: str | None, ref: str | None) -> tuple[str, str]:
  """The repository URL and git ref from the flags or the environment; never a guessed default."""
  repo = repo or os.environ.get(REPO_ENV)
  ref = ref or os.environ.get(REF_ENV)
  missing = []
  if not repo:
    missing.append(f'the repository URL (pass --repo=URL or set {REPO_ENV})')
  if not ref:
    missing.append(f'the git ref (pass --ref=GIT_REF or set {REF_ENV})')
  if missing:
    fail(f'missing {" and ".join(missing)}: every host must install the same, named code')
  return repo, ref


def parser(description: str) -> argparse.ArgumentParser:
  """A parser with the arguments every launcher takes: CONFIG, WORKDIR and --dry-run.

  Arguments the parser does not know are train overrides (see `parse`); prefix matching is off so
  that an override is never taken for an abbreviated launcher flag.
  """
  p = argparse.ArgumentParser(
      description=description, allow_abbrev=False,
      epilog='Arguments the launcher does not know (e.g. --config.train.steps=100) are passed to '
      'python -m jaxformer.train unchanged; put them after WORKDIR, in --flag=value form, or '
      'after "--".')
  p.add_argument('config', metavar='CONFIG[:arg]', help='experiment config file, e.g. '
                 'configs/llama.py:size=tiny')
  p.add_argument('workdir', metavar='WORKDIR', help='checkpoints, logs and metrics')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                 help='print the exact commands (and files) and run nothing')
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None):
  """(launcher arguments, train overrides in their original order).

  Everything after the first '--' is a train argument, even one that looks like a launcher flag.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = []
  if '--' in argv:
    argv, rest = argv[:argv.index('--')], argv[argv.index('--') + 1:]
  args, overrides = p.parse_known_args(argv)
  return args, overrides + rest


def main_guard(main):
  """Runs `main`; a failed command or Ctrl-C ends with its exit status and no traceback."""
  try:
    return main()
  except subprocess.CalledProcessError as e:
    print(f'{prog()}: error: command failed with exit status {e.returncode}: '
          f'{join(e.cmd)}', file=sys.stderr)
    return e.returncode or 1
  except KeyboardInterrupt:
    print(f'{prog()}: interrupted', file=sys.stderr)
    return 130
