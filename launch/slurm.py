"""Train on a SLURM GPU cluster: writes an sbatch script, and submits it with --submit.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --venv=/shared/venvs/jaxformer --submit configs/llama.py:size=small /shared/runs/llama

The script asks for N whole nodes (--exclusive) with G GPUs each and runs one process per node
(--per=node: each process drives the node's G GPUs) or one per GPU (--per=gpu: G tasks per node,
CUDA_VISIBLE_DEVICES=$SLURM_LOCALID so that each sees one GPU). Every task runs the same train
command and joins one `jax.distributed` job explicitly: the coordinator is the first host of
$SLURM_JOB_NODELIST on --port, the process count $SLURM_NTASKS and the process id
$SLURM_PROCID. Explicit flags rather than --multihost because they also work in an sbatch
script's own srun steps on any SLURM version, and the script shows the whole set-up.

The script activates --venv (or $JAXFORMER_VENV) and runs in --repo_dir (default: the current
folder), both on the cluster's shared filesystem. --install first creates the venv and runs
`pip install -e '.[cuda]'` in the repository, cloning --repo at --ref (or $JAXFORMER_REPO,
$JAXFORMER_REF; never guessed) when --repo_dir does not exist yet.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import common

VENV_ENV = 'JAXFORMER_VENV'
HEREDOC_END = 'JAXFORMER_SBATCH_EOF'
# Set in the batch script and read by every task's shell (srun passes the environment on).
COORDINATOR = common.ShellExpr('$COORD:$PORT')
NUM_PROCESSES = common.ShellExpr('$SLURM_NTASKS')
PROCESS_ID = common.ShellExpr('$SLURM_PROCID')


def job_name(config: str) -> str:
  stem = os.path.splitext(os.path.basename(config.split(':', 1)[0]))[0]
  return 'jaxformer-' + (re.sub(r'[^A-Za-z0-9._-]', '_', stem) or 'run')


def srun_line(config: str, workdir: str, overrides: Sequence[str], per: str) -> str:
  """`srun ... bash -c '...'`: every task's shell expands its own $SLURM_PROCID."""
  train = common.train_command(config, workdir, overrides, coordinator_address=COORDINATOR,
                               num_processes=NUM_PROCESSES, process_id=PROCESS_ID)
  task = 'exec ' + common.join(train)
  if per == 'gpu':
    task = 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID" ' + task
  return common.join(['srun', '--kill-on-bad-exit=1', 'bash', '-c', task])


def sbatch_script(*, config: str, workdir: str, overrides: Sequence[str], nodes: int,
                  gpus_per_node: int, per: str, venv: str, repo_dir: str, log_dir: str,
                  name: str, port: int, partition: str | None = None, time: str | None = None,
                  account: str | None = None) -> str:
  """The text of the sbatch script."""
  q = common.quote
  directives = [f'--job-name={name}', f'--nodes={nodes}',
                f'--ntasks-per-node={1 if per == "node" else gpus_per_node}',
                f'--gpus-per-node={gpus_per_node}', '--exclusive']
  directives += [f'--{key}={value}' for key, value in
                 (('partition', partition), ('time', time), ('account', account)) if value]
  directives.append(f'--output={log_dir}/%x-%j.out')
  lines = ['#!/bin/bash',
           '# jaxformer training job, written by launch/slurm.py.',
           *[f'#SBATCH {d}' for d in directives],
           'set -e',  # no pipefail: `head -n1` may close the pipe before scontrol is done
           f'cd {q(repo_dir)}',
           f'. {q(os.path.join(venv, "bin", "activate"))}',
           '# jax.distributed: process 0, the coordinator, runs on the first node of the job.',
           'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
           '[ -n "$COORD" ] || { echo "no host in SLURM_JOB_NODELIST" >&2; exit 1; }',
           f'PORT={port}',
           'export COORD PORT',
           'echo "jaxformer: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes, '
           'coordinator $COORD:$PORT"',
           srun_line(config, workdir, overrides, per)]
  return '\n'.join(lines) + '\n'


def install_commands(*, venv: str, repo_dir: str, repo: str | None, ref: str | None,
                     python: str) -> list[common.Command]:
  """Clone (only when repo_dir is missing), create the venv, pip install -e '.[cuda]'."""
  commands = []
  if not os.path.isdir(repo_dir):
    repo, ref = common.repo_and_ref(repo, ref)
    commands += [
        common.Command.of(['git', 'clone', '--quiet', repo, repo_dir]),
        common.Command.of(['git', '-C', repo_dir, 'fetch', '--quiet', repo, ref]),
        common.Command.of(['git', '-C', repo_dir, 'checkout', '--quiet', '--detach',
                           'FETCH_HEAD'])]
  elif repo or ref:
    common.warn(f'{repo_dir} exists: --repo/--ref are only used to clone a missing --repo_dir')
  return commands + [
      common.Command.of([python, '-m', 'venv', venv]),
      common.Command.of([os.path.join(venv, 'bin', 'pip'), 'install', '-e', '.[cuda]'],
                        cwd=repo_dir)]


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser(__doc__.split('\n', 1)[0])
  p.add_argument('--nodes', type=int, required=True, help='number of nodes')
  p.add_argument('--gpus_per_node', type=int, required=True, help='GPUs per node')
  p.add_argument('--per', choices=('node', 'gpu'), default='node',
                 help='one process per node (all its GPUs) or per GPU')
  p.add_argument('--partition', default=None)
  p.add_argument('--time', default=None, help='time limit, HH:MM:SS')
  p.add_argument('--account', default=None)
  p.add_argument('--venv', default=None,
                 help=f'virtual environment with jaxformer installed (or ${VENV_ENV})')
  p.add_argument('--repo_dir', default=None,
                 help='the repository on the shared filesystem (default: the current folder)')
  p.add_argument('--port', type=int, default=12345, help='coordinator port on the first node')
  p.add_argument('--name', default=None, help='job name (default: jaxformer-CONFIG)')
  p.add_argument('--script_path', default=None,
                 help='where to write the script (default: launch_logs/slurm/NAME.sbatch)')
  p.add_argument('--submit', action='store_true', help='run sbatch on the script')
  p.add_argument('--install', action='store_true',
                 help="create --venv and pip install -e '.[cuda]' in --repo_dir first")
  p.add_argument('--repo', default=None,
                 help=f'with --install: git URL to clone into a missing --repo_dir '
                 f'(or ${common.REPO_ENV})')
  p.add_argument('--ref', default=None,
                 help=f'with --install: branch, tag or full commit (or ${common.REF_ENV})')
  p.add_argument('--python', default='python3', help='with --install: Python (>= 3.11)')
  args, overrides = common.parse(p, argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    common.fail('--nodes and --gpus_per_node must be at least 1')
  if not 0 < args.port < 65536:
    common.fail('--port must be in 1..65535')
  venv = args.venv or os.environ.get(VENV_ENV)
  if not venv:
    common.fail(f'missing the virtual environment: pass --venv=PATH or set {VENV_ENV}')
  venv = os.path.abspath(os.path.expanduser(venv))
  repo_dir = os.path.abspath(os.path.expanduser(args.repo_dir or os.getcwd()))
  name = args.name or job_name(args.config)
  script_path = args.script_path or os.path.join('launch_logs', 'slurm', f'{name}.sbatch')
  log_dir = os.path.dirname(os.path.abspath(script_path))
  for flag, value in (('--name', name), ('--partition', args.partition), ('--time', args.time),
                      ('--account', args.account), ('--script_path', log_dir)):
    if value and re.search(r'\s', value):
      common.fail(f'{flag} may not contain whitespace (it goes into an #SBATCH line)')

  commands = []
  if args.install:
    commands = install_commands(venv=venv, repo_dir=repo_dir, repo=args.repo, ref=args.ref,
                                python=args.python)
  script = sbatch_script(config=args.config, workdir=args.workdir, overrides=overrides,
                         nodes=args.nodes, gpus_per_node=args.gpus_per_node, per=args.per,
                         venv=venv, repo_dir=repo_dir, log_dir=log_dir, name=name,
                         port=args.port, partition=args.partition, time=args.time,
                         account=args.account)
  submit = [common.Command.of(['sbatch', script_path])] if args.submit else []
  hint = f'submit with: sbatch {common.quote(script_path)}'
  if args.dry_run:
    common.run(commands, dry_run=True)
    # The script as a heredoc: the whole output, pasted into a shell, does what the launch does.
    print(common.join(['mkdir', '-p', os.path.dirname(script_path) or '.']))
    print(f'cat > {common.quote(script_path)} <<\'{HEREDOC_END}\'')
    print(script, end='')
    print(HEREDOC_END)
    common.run(submit, dry_run=True)
    if not args.submit:
      print(hint, file=sys.stderr)
    return 0
  common.run(commands, dry_run=False)
  os.makedirs(os.path.dirname(script_path) or '.', exist_ok=True)
  with open(script_path, 'w') as f:
    f.write(script)
  print(f'+ wrote {script_path}', file=sys.stderr)
  common.run(submit, dry_run=False)
  if not args.submit:
    print(hint)
  return 0


if __name__ == '__main__':
  sys.exit(common.main_guard(main))
