"""Train on this machine: one process, or N processes on 127.0.0.1 to test multi-process runs.

  python launch/local.py configs/quickstart.py runs/quickstart [--config.train.steps=100 ...]
  python launch/local.py --num_processes=2 --devices_per_process=4 configs/quickstart.py runs/mp

One process runs `python -m jaxformer.train` with this interpreter (CPU, or every local GPU/TPU
chip). With --num_processes=N > 1 the launcher starts N copies of the same train command, each
joining one `jax.distributed` job through a coordinator on 127.0.0.1 (process 0 listens on
127.0.0.1 only, via JAX_COORDINATOR_BIND_ADDRESS). That exercises the multi-host code paths
(process-local data shards, cross-process checkpointing) on one CPU machine; with
--devices_per_process=K each process simulates K CPU devices. Their output is streamed with a
[pI] prefix; when one fails the others are stopped, and the launcher exits non-zero.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

import common

LOCALHOST = '127.0.0.1'


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((LOCALHOST, 0))
    return s.getsockname()[1]


def build(config: str, workdir: str, overrides: Sequence[str], *, num_processes: int = 1,
          devices_per_process: int | None = None, port: int | None = None,
          python: str | None = None) -> list[common.Command]:
  """The train command of every local process (one when num_processes == 1)."""
  python = python or sys.executable
  env = {}
  if devices_per_process is not None:
    env['XLA_FLAGS'] = common.with_device_count(os.environ.get('XLA_FLAGS'), devices_per_process)
  if num_processes == 1:
    return [common.Command.of(common.train_command(config, workdir, overrides, python=python),
                              env)]
  address = f'{LOCALHOST}:{port or free_port()}'
  env.update(JAX_COORDINATOR_BIND_ADDRESS=address, PYTHONUNBUFFERED='1')
  return [common.Command.of(common.train_command(
      config, workdir, overrides, python=python, coordinator_address=address,
      num_processes=num_processes, process_id=i), env) for i in range(num_processes)]


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + grace_s
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def run_parallel(commands: Sequence[common.Command], poll_s: float = 0.1) -> int:
  """Runs the commands concurrently, output prefixed with [pI]; the first failure stops the rest.

  Returns 0 when all succeed, else the exit status of the first process that failed.
  """
  lock = threading.Lock()
  out = sys.stdout.buffer

  def pump(prefix: bytes, stream) -> None:
    for line in iter(stream.readline, b''):
      with lock:
        out.write(prefix + line if line.endswith(b'\n') else prefix + line + b'\n')
        out.flush()
    stream.close()

  procs, pumps = [], []
  try:
    for i, command in enumerate(commands):
      common.announce(command)
      proc = subprocess.Popen(list(command.argv), env=command.environ(), cwd=command.cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
      procs.append(proc)
      pumps.append(threading.Thread(target=pump, args=(f'[p{i}] '.encode(), proc.stdout),
                                    daemon=True))
      pumps[-1].start()
    while True:
      codes = [proc.poll() for proc in procs]
      failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        i, status = failed[0]
        common.warn(f'process {i} exited with status {status}: stopping the others')
        _stop(procs)
        break
      if None not in codes:
        status = 0
        break
      time.sleep(poll_s)
  except BaseException:
    _stop(procs)
    raise
  for thread in pumps:  # a leftover grandchild holding the pipe must not block the exit
    thread.join(timeout=10)
  return status if status >= 0 else 1  # killed by a signal: -N


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser(__doc__.split('\n', 1)[0])
  p.add_argument('--num_processes', type=int, default=1,
                 help='number of local processes (> 1: one jax.distributed job on 127.0.0.1)')
  p.add_argument('--devices_per_process', type=int, default=None,
                 help='simulated CPU devices per process '
                 '(XLA_FLAGS=--xla_force_host_platform_device_count=K)')
  p.add_argument('--port', type=int, default=None,
                 help='coordinator port on 127.0.0.1 (default: a free one)')
  args, overrides = common.parse(p, argv)
  if args.num_processes < 1:
    common.fail('--num_processes must be at least 1')
  if args.devices_per_process is not None and args.devices_per_process < 1:
    common.fail('--devices_per_process must be at least 1')
  if args.port is not None and not 0 < args.port < 65536:
    common.fail('--port must be in 1..65535')
  if args.port is not None and args.num_processes == 1:
    common.warn('--port is only used with --num_processes > 1')
  commands = build(args.config, args.workdir, overrides, num_processes=args.num_processes,
                   devices_per_process=args.devices_per_process, port=args.port)
  if args.dry_run:
    if len(commands) > 1:
      print(f'# the {len(commands)} commands below run concurrently', file=sys.stderr)
    common.run(commands, dry_run=True)
    return 0
  if len(commands) == 1:
    common.run(commands, dry_run=False)
    return 0
  return run_parallel(commands)


if __name__ == '__main__':
  sys.exit(common.main_guard(main))
