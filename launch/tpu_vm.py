"""Train on a Cloud TPU VM, a single host or a pod slice, through gcloud.

  python launch/tpu_vm.py --tpu=my-v5e --zone=us-west4-a \
      --create --accelerator_type=v5litepod-16 --runtime_version=v2-alpha-tpuv5-lite \
      --delete_after --repo=https://github.com/ORG/jaxformer.git --ref=main \
      configs/llama.py:size=small gs://my-bucket/runs/llama [--config.train.steps=1000 ...]

The steps, each one gcloud command (see them all with --dry-run):
1. with --create: `gcloud compute tpus tpu-vm create` (--accelerator_type and --runtime_version
   are then required: a guessed default would silently pick the wrong chip or image);
2. on every worker (`--worker=all`): clone --repo (or reuse the clone), fetch and check out
   --ref, create a venv and `pip install -e '.[tpu]'`; the repository and ref are never guessed,
   so that every host provably runs the same code;
3. on every worker: the same train command with `--multihost` (jax.distributed.initialize()
   finds the slice's hosts from the TPU VM metadata), each worker streaming its output and
   writing it to ~/jaxformer-logs/RUN/worker-HOSTNAME.log;
4. copy those logs into --logs_dir (default launch_logs/TPU) with `gcloud ... scp --worker=all`;
5. with --delete_after: delete the slice (also when training failed; the logs are copied first).

WORKDIR should be a gs:// path: every host writes checkpoints and metrics to the same folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Sequence

import common

GCLOUD_TPU = ('gcloud', 'compute', 'tpus', 'tpu-vm')
LOG_ROOT = 'jaxformer-logs'


def run_name(workdir: str) -> str:
  """A file-name-safe run name from the workdir's last component."""
  name = re.sub(r'[^A-Za-z0-9._-]', '_', workdir.rstrip('/').rsplit('/', 1)[-1])
  return name.strip('.') or 'run'


def _where(args) -> list[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _ssh_all(args, statements: Sequence[str]) -> common.Command:
  """`gcloud ... ssh TPU --worker=all --command=...`: the statements run in every worker's shell."""
  return common.Command.of([*GCLOUD_TPU, 'ssh', args.tpu, *_where(args), '--worker=all',
                            '--command=' + '; '.join(statements)])


def install_statements(repo: str, ref: str, remote_dir: str, python: str) -> list[str]:
  """Clone (once) REPO, check out exactly REF fetched from REPO, venv, pip install -e '.[tpu]'."""
  j = common.join
  return [
      'set -e',
      f'[ -d {j([remote_dir + "/.git"])} ] || {j(["git", "clone", "--quiet", repo, remote_dir])}',
      j(['cd', remote_dir]),
      j(['git', 'fetch', '--quiet', repo, ref]),
      j(['git', 'checkout', '--quiet', '--detach', 'FETCH_HEAD']),
      j([python, '-m', 'venv', '.venv']),
      '. .venv/bin/activate',
      j(['pip', 'install', '-e', '.[tpu]']),
  ]


def train_statements(train: Sequence[str], remote_dir: str, run: str) -> list[str]:
  """Run the train command in the venv; tee its output to the worker's log file."""
  j = common.join
  log_dir = common.ShellExpr(f'$HOME/{LOG_ROOT}/{run}')
  log = common.ShellExpr(f'$HOME/{LOG_ROOT}/{run}/worker-$(hostname).log')
  return [
      'set -eo pipefail',
      j(['cd', remote_dir]),
      '. .venv/bin/activate',
      'export PYTHONUNBUFFERED=1',
      j(['mkdir', '-p', log_dir]),
      f'{j(train)} 2>&1 | {j(["tee", log])}',
  ]


def plan(args, overrides: Sequence[str], repo: str, ref: str) -> dict[str, list[common.Command]]:
  """The commands of each step, in order: create, install, train, collect, delete."""
  run = args.run_name or run_name(args.workdir)
  logs_dir = args.logs_dir or os.path.join('launch_logs', args.tpu)
  train = common.train_command(args.config, args.workdir, overrides, multihost=True)
  steps = {'create': [], 'install': [], 'train': [], 'collect': [], 'delete': []}
  if args.create:
    steps['create'].append(common.Command.of(
        [*GCLOUD_TPU, 'create', args.tpu, *_where(args),
         f'--accelerator-type={args.accelerator_type}', f'--version={args.runtime_version}']))
  steps['install'].append(
      _ssh_all(args, install_statements(repo, ref, args.remote_dir, args.python)))
  steps['train'].append(_ssh_all(args, train_statements(train, args.remote_dir, run)))
  steps['collect'] += [
      common.Command.of(['mkdir', '-p', logs_dir]),
      common.Command.of([*GCLOUD_TPU, 'scp', '--recurse', f'{args.tpu}:{LOG_ROOT}/{run}',
                         logs_dir, *_where(args), '--worker=all'])]
  if args.delete_after:
    steps['delete'].append(common.Command.of(
        [*GCLOUD_TPU, 'delete', args.tpu, *_where(args), '--quiet']))
  return steps


def execute(steps: dict[str, list[common.Command]]) -> None:
  """Create and install; train; then always collect the logs (best effort) and delete."""
  common.run(steps['create'], dry_run=False)
  trained = False
  try:
    common.run(steps['install'], dry_run=False)
    trained = True
    common.run(steps['train'], dry_run=False)
  finally:
    if trained:
      try:
        common.run(steps['collect'], dry_run=False)
      except subprocess.CalledProcessError as e:
        common.warn(f'collecting the logs failed (exit status {e.returncode})')
    common.run(steps['delete'], dry_run=False)


def main(argv: Sequence[str] | None = None) -> int:
  p = common.parser(__doc__.split('\n', 1)[0])
  p.add_argument('--tpu', required=True, help='TPU VM (slice) name')
  p.add_argument('--zone', required=True, help='its zone, e.g. us-west4-a')
  p.add_argument('--project', default=None, help='Google Cloud project (default: gcloud\'s)')
  p.add_argument('--create', action='store_true', help='create the slice first')
  p.add_argument('--accelerator_type', default=None,
                 help='with --create: e.g. v5litepod-16 (a 4-host v5e slice), v4-8')
  p.add_argument('--runtime_version', default=None,
                 help='with --create: TPU VM image, e.g. v2-alpha-tpuv5-lite')
  p.add_argument('--delete_after', action='store_true',
                 help='delete the slice when the run ends (after collecting the logs)')
  p.add_argument('--repo', default=None,
                 help=f'git URL to install on every worker (or ${common.REPO_ENV})')
  p.add_argument('--ref', default=None,
                 help=f'branch, tag or full commit to check out (or ${common.REF_ENV})')
  p.add_argument('--remote_dir', default='jaxformer',
                 help='clone folder on the workers, relative to the home directory')
  p.add_argument('--python', default='python3',
                 help='Python (>= 3.11) on the workers that creates the venv')
  p.add_argument('--run_name', default=None,
                 help='log folder name on the workers (default: the last part of WORKDIR)')
  p.add_argument('--logs_dir', default=None,
                 help='local folder for the workers\' logs (default: launch_logs/TPU)')
  args, overrides = common.parse(p, argv)
  if args.create and not (args.accelerator_type and args.runtime_version):
    common.fail('--create needs --accelerator_type (e.g. v5litepod-16) and --runtime_version '
                '(e.g. v2-alpha-tpuv5-lite)')
  if not args.create and (args.accelerator_type or args.runtime_version):
    common.warn('--accelerator_type and --runtime_version are only used with --create')
  if args.run_name and run_name(args.run_name) != args.run_name:
    common.fail('--run_name may only contain letters, digits, ".", "_" and "-"')
  repo, ref = common.repo_and_ref(args.repo, args.ref)
  if not args.workdir.startswith('gs://'):
    common.warn(f'WORKDIR {args.workdir} is not a gs:// path: every host of a slice must write '
                'the same folder')
  steps = plan(args, overrides, repo, ref)
  if args.dry_run:
    common.run([c for commands in steps.values() for c in commands], dry_run=True)
    return 0
  execute(steps)
  return 0


if __name__ == '__main__':
  sys.exit(common.main_guard(main))
