"""The launchers' commands, checked through --dry-run (no gcloud, SLURM or network needed).

The generated remote commands are also run through a real bash with fake `python`, `srun` and
`scontrol` programs, so quoting is checked by the shell that will parse it, not by shlex alone.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

import common
import local
import slurm
import tpu_vm

REPO = 'https://github.com/example-org/jaxformer.git'
REF = 'v0.3.1'
CONFIG = 'configs/llama.py:size=small'
# Arguments as the shell hands them to the launcher (the user typed them quoted).
TRICKY = ['--config.train.sample_prompt=def f(x):',
          '--config.train.note=it\'s "quoted" $HOME `id` a;b|c&&d * ~',
          '--config.train.steps=7']
TPU_ARGS = ['--tpu=pod16', '--zone=us-west4-a', '--project=my-proj', '--create',
            '--accelerator_type=v5litepod-16', '--runtime_version=v2-alpha-tpuv5-lite',
            '--delete_after', f'--repo={REPO}', f'--ref={REF}']
FAKE_PYTHON = '''#!{exe}
import json, os, sys
print(json.dumps({{'argv': sys.argv[1:], 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),
                   'unbuffered': os.environ.get('PYTHONUNBUFFERED')}}))
'''


def lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def command_payload(line):
  """The --command= payload of a `gcloud ... ssh` line."""
  payloads = [w[len('--command='):] for w in shlex.split(line) if w.startswith('--command=')]
  assert len(payloads) == 1, line
  return payloads[0]


def train_words(words):
  """The one `python -m jaxformer.train ...` inside a word list, up to a redirection."""
  starts = [i for i in range(len(words) - 2)
            if words[i + 1:i + 3] == ['-m', 'jaxformer.train']]
  assert len(starts) == 1, words
  end = next((i for i in range(starts[0], len(words)) if words[i] in ('2>&1', '|')), len(words))
  return words[starts[0]:end]


def local_train(launch, *overrides):
  """The train command local.py builds, without its interpreter path."""
  out = lines(launch('local', CONFIG, 'gs://bucket/runs/llama', *overrides, '--dry-run'))
  assert len(out) == 1
  words = shlex.split(out[0])
  assert words[0] == sys.executable
  return words[1:]


def make_fake_python(folder):
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / 'python'
  path.write_text(FAKE_PYTHON.format(exe=sys.executable))
  path.chmod(0o755)
  return folder


def write_script(path, text):
  path.write_text(text)
  path.chmod(0o755)


# --- Cloud TPU VM -------------------------------------------------------------------------------

def test_tpu_v5e_16_slice_create_install_train_collect_delete_in_order(launch):
  out = lines(launch('tpu_vm', *TPU_ARGS, CONFIG, 'gs://bucket/runs/llama', *TRICKY,
                     '--dry-run'))
  words = [shlex.split(line) for line in out]
  gcloud = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  steps = [w[4] if w[:4] == gcloud else w[0] for w in words]
  assert steps == ['create', 'ssh', 'ssh', 'mkdir', 'scp', 'delete']
  for w in words:
    if w[:4] == gcloud:
      assert 'pod16' in w[5:] or 'pod16:jaxformer-logs/llama' in w[5:]
      assert '--zone=us-west4-a' in w and '--project=my-proj' in w
  create, install, train, mkdir, scp, delete = words

  assert '--accelerator-type=v5litepod-16' in create
  assert '--version=v2-alpha-tpuv5-lite' in create

  assert '--worker=all' in install
  steps = command_payload(out[1]).split('; ')
  assert f'[ -d jaxformer/.git ] || git clone --quiet {REPO} jaxformer' in steps
  assert f'git fetch --quiet {REPO} {REF}' in steps
  assert steps.index(f'git fetch --quiet {REPO} {REF}') < steps.index(
      'git checkout --quiet --detach FETCH_HEAD') < steps.index("pip install -e '.[tpu]'")
  assert re.findall(r'https?://\S+', command_payload(out[1])) == [REPO, REPO]

  assert '--worker=all' in train
  payload = command_payload(out[2])
  remote = train_words(shlex.split(payload))
  expected = local_train(launch, *TRICKY)
  expected.insert(expected.index('--workdir=gs://bucket/runs/llama') + 1, '--multihost')
  assert remote == ['python'] + expected
  assert payload.endswith('| tee "$HOME/jaxformer-logs/llama/worker-$(hostname).log"')

  assert mkdir == ['mkdir', '-p', 'launch_logs/pod16']
  assert scp[5:7] == ['--recurse', 'pod16:jaxformer-logs/llama']
  assert 'launch_logs/pod16' in scp and '--worker=all' in scp
  assert delete == gcloud + ['delete', 'pod16', '--zone=us-west4-a', '--project=my-proj',
                             '--quiet']


def test_tpu_without_create_or_delete_only_installs_trains_collects(launch):
  out = lines(launch('tpu_vm', '--tpu=v4', '--zone=us-central2-b', f'--repo={REPO}',
                     f'--ref={REF}', CONFIG, 'gs://b/r', '--dry-run'))
  assert [shlex.split(line)[4] for line in out if line.startswith('gcloud')] == [
      'ssh', 'ssh', 'scp']
  assert not any('--project' in line for line in out)


def test_tpu_train_payload_runs_in_bash_on_every_worker(launch, tmp_path):
  """The remote shell gives the train command exactly the user's arguments and logs them."""
  out = lines(launch('tpu_vm', *TPU_ARGS, CONFIG, 'gs://bucket/runs/llama', *TRICKY,
                     '--dry-run'))
  home = tmp_path / 'home'
  fake_bin = make_fake_python(tmp_path / 'bin')
  (home / 'jaxformer' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'jaxformer' / '.venv' / 'bin' / 'activate').write_text(f'PATH={fake_bin}:$PATH\n')
  env = {'HOME': str(home), 'PATH': os.environ['PATH']}
  result = subprocess.run(['bash', '-c', command_payload(out[2])], cwd=home, env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  seen = json.loads(result.stdout)
  assert seen['argv'] == ['-m', 'jaxformer.train', f'--config={CONFIG}',
                          '--workdir=gs://bucket/runs/llama', '--multihost', *TRICKY]
  assert seen['unbuffered'] == '1'
  logs = list((home / 'jaxformer-logs' / 'llama').glob('worker-*.log'))
  assert len(logs) == 1 and json.loads(logs[0].read_text()) == seen


def test_tpu_create_requires_accelerator_type_and_runtime_version(launch):
  result = launch('tpu_vm', '--tpu=t', '--zone=z', '--create', f'--repo={REPO}', f'--ref={REF}',
                  CONFIG, 'gs://b/r', '--dry-run')
  assert result.returncode != 0 and result.stdout == ''
  assert '--accelerator_type' in result.stderr and '--runtime_version' in result.stderr


def test_tpu_warns_when_workdir_is_not_on_gcs(launch):
  result = launch('tpu_vm', '--tpu=t', '--zone=z', f'--repo={REPO}', f'--ref={REF}', CONFIG,
                  'runs/local', '--dry-run')
  assert result.returncode == 0
  assert 'warning' in result.stderr and 'gs://' in result.stderr


def test_tpu_failed_training_still_collects_logs_and_deletes(monkeypatch, capsys):
  """Without --dry-run: commands run in order with check=True; a failed run cleans up."""
  calls = []

  def fake_run(argv, check, env=None, cwd=None):
    assert check is True
    calls.append(argv)
    if argv[4:5] == ['ssh'] and 'jaxformer.train' in argv[-1]:
      raise subprocess.CalledProcessError(3, argv)
    return subprocess.CompletedProcess(argv, 0)

  monkeypatch.setattr(subprocess, 'run', fake_run)
  code = common.main_guard(lambda: tpu_vm.main([*TPU_ARGS, CONFIG, 'gs://b/r']))
  assert code == 3
  assert [c[4] if c[0] == 'gcloud' else c[0] for c in calls] == [
      'create', 'ssh', 'ssh', 'mkdir', 'scp', 'delete']
  err = capsys.readouterr().err
  assert err.count('+ gcloud') == 5 and 'Traceback' not in err


# --- repository and ref -------------------------------------------------------------------------

def test_missing_repo_and_ref_is_a_one_line_error_naming_flags_and_env(launch):
  result = launch('tpu_vm', '--tpu=t', '--zone=z', CONFIG, 'gs://b/r', '--dry-run')
  assert result.returncode != 0 and result.stdout == ''
  errors = [line for line in result.stderr.splitlines() if 'error' in line]
  assert len(errors) == 1
  for name in ('--repo', 'JAXFORMER_REPO', '--ref', 'JAXFORMER_REF'):
    assert name in errors[0]
  assert 'Traceback' not in result.stderr


def test_missing_ref_alone_names_only_ref(launch):
  result = launch('tpu_vm', '--tpu=t', '--zone=z', f'--repo={REPO}', CONFIG, 'gs://b/r',
                  '--dry-run')
  assert result.returncode != 0
  assert '--ref' in result.stderr and 'JAXFORMER_REF' in result.stderr
  assert 'JAXFORMER_REPO' not in result.stderr and 'Traceback' not in result.stderr


def test_repo_and_ref_from_the_environment(launch):
  result = launch('tpu_vm', '--tpu=t', '--zone=z', CONFIG, 'gs://b/r', '--dry-run',
                  env={'JAXFORMER_REPO': REPO, 'JAXFORMER_REF': REF})
  install = command_payload(lines(result)[0])
  assert f'git clone --quiet {REPO} jaxformer' in install
  assert f'git fetch --quiet {REPO} {REF}' in install


def test_slurm_install_clones_only_a_missing_repo_dir_and_needs_repo_and_ref(launch, tmp_path):
  base = ['--nodes=1', '--gpus_per_node=1', f'--venv={tmp_path}/venv', '--install', CONFIG,
          '/shared/run', '--dry-run']
  missing = tmp_path / 'clone'
  result = launch('slurm', f'--repo_dir={missing}', *base)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert '--repo' in result.stderr and 'JAXFORMER_REPO' in result.stderr

  out = lines(launch('slurm', f'--repo_dir={missing}', *base,
                     env={'JAXFORMER_REPO': REPO, 'JAXFORMER_REF': REF}))
  assert out[:5] == [
      f'git clone --quiet {REPO} {missing}',
      f'git -C {missing} fetch --quiet {REPO} {REF}',
      f'git -C {missing} checkout --quiet --detach FETCH_HEAD',
      f'python3 -m venv {tmp_path}/venv',
      f"cd {missing} && {tmp_path}/venv/bin/pip install -e '.[cuda]'"]

  out = lines(launch('slurm', f'--repo_dir={tmp_path}', *base))  # exists: no clone, no repo
  assert out[:2] == [f'python3 -m venv {tmp_path}/venv',
                     f"cd {tmp_path} && {tmp_path}/venv/bin/pip install -e '.[cuda]'"]


# --- SLURM --------------------------------------------------------------------------------------

def sbatch_from_dry_run(out):
  """The script text between the heredoc markers of slurm.py --dry-run."""
  start = next(i for i, line in enumerate(out) if line.startswith('cat > '))
  end = out.index(slurm.HEREDOC_END)
  return out[start + 1:end]


@pytest.mark.parametrize('per,tasks_per_node', [('node', 1), ('gpu', 8)])
def test_slurm_two_nodes_script(launch, tmp_path, per, tasks_per_node):
  out = lines(launch('slurm', '--nodes=2', '--gpus_per_node=8', f'--per={per}',
                     '--partition=a100', '--time=12:00:00', '--account=lab',
                     f'--venv={tmp_path}/venv', f'--repo_dir={tmp_path}', '--port=23456',
                     CONFIG, '/shared/runs/llama', *TRICKY, '--dry-run', '--submit'))
  script = sbatch_from_dry_run(out)
  assert script[0] == '#!/bin/bash'
  directives = [line.split(' ', 1)[1] for line in script if line.startswith('#SBATCH ')]
  assert directives[:5] == ['--job-name=jaxformer-llama', '--nodes=2',
                            f'--ntasks-per-node={tasks_per_node}', '--gpus-per-node=8',
                            '--exclusive']
  assert {'--partition=a100', '--time=12:00:00', '--account=lab'} <= set(directives)
  assert f'. {tmp_path}/venv/bin/activate' in script
  assert 'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
  assert 'PORT=23456' in script

  sruns = [line for line in script if line.startswith('srun ')]
  assert len(sruns) == 1
  words = shlex.split(sruns[0])
  assert words[:4] == ['srun', '--kill-on-bad-exit=1', 'bash', '-c'] and len(words) == 5
  task = shlex.split(words[4])
  assert (task[0] == 'CUDA_VISIBLE_DEVICES=$SLURM_LOCALID') == (per == 'gpu')
  assert 'CUDA_VISIBLE_DEVICES' not in words[4] or per == 'gpu'
  assert train_words(task) == [
      'python', '-m', 'jaxformer.train', f'--config={CONFIG}', '--workdir=/shared/runs/llama',
      '--coordinator_address=$COORD:$PORT', '--num_processes=$SLURM_NTASKS',
      '--process_id=$SLURM_PROCID', *TRICKY]
  assert out[-1] == 'sbatch launch_logs/slurm/jaxformer-llama.sbatch'


@pytest.mark.parametrize('per', ['node', 'gpu'])
def test_slurm_script_runs_every_task_with_its_own_process_id(launch, tmp_path, per):
  """The script under bash with fake scontrol/srun: task 9 of 16 gets the right arguments."""
  fake_bin = make_fake_python(tmp_path / 'bin')
  write_script(fake_bin / 'scontrol', '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && '
               'printf "gpu-a07\\ngpu-a08\\n"\n')
  write_script(fake_bin / 'srun', '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
               'SLURM_PROCID=9 SLURM_LOCALID=1 exec "$@"\n')
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  (tmp_path / 'venv' / 'bin' / 'activate').write_text(f'PATH={fake_bin}:$PATH\n')
  out = lines(launch('slurm', '--nodes=2', '--gpus_per_node=8', f'--per={per}',
                     f'--venv={tmp_path}/venv', f'--repo_dir={tmp_path}', CONFIG, 'runs/x',
                     *TRICKY, '--dry-run'))
  script = tmp_path / 'job.sbatch'
  script.write_text('\n'.join(sbatch_from_dry_run(out)) + '\n')
  env = {'PATH': os.environ['PATH'], 'SLURM_JOB_NODELIST': 'gpu-a[07-08]', 'SLURM_NTASKS': '16',
         'SLURM_JOB_NUM_NODES': '2'}
  result = subprocess.run(['bash', str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
  assert result.returncode == 0, result.stderr
  seen = json.loads(result.stdout.splitlines()[-1])
  assert seen['argv'] == ['-m', 'jaxformer.train', f'--config={CONFIG}', '--workdir=runs/x',
                          '--coordinator_address=gpu-a07:12345', '--num_processes=16',
                          '--process_id=9', *TRICKY]
  assert seen['cuda'] == ('1' if per == 'gpu' else None)


def test_slurm_without_submit_only_writes_the_script(launch, tmp_path):
  path = tmp_path / 'jobs' / 'run.sbatch'
  result = launch('slurm', '--nodes=2', '--gpus_per_node=8', f'--venv={tmp_path}/venv',
                  f'--script_path={path}', CONFIG, '/shared/run')
  assert result.returncode == 0, result.stderr
  text = path.read_text()
  assert text.startswith('#!/bin/bash\n') and '#SBATCH --nodes=2' in text
  assert f'#SBATCH --output={path.parent}/%x-%j.out' in text
  assert f'sbatch {path}' in result.stdout


def test_slurm_needs_a_venv(launch):
  result = launch('slurm', '--nodes=1', '--gpus_per_node=1', CONFIG, 'w', '--dry-run')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert '--venv' in result.stderr and 'JAXFORMER_VENV' in result.stderr
  result = launch('slurm', '--nodes=1', '--gpus_per_node=1', CONFIG, 'w', '--dry-run',
                  env={'JAXFORMER_VENV': '/opt/venv'})
  assert '. /opt/venv/bin/activate' in lines(result)


# --- quoting ------------------------------------------------------------------------------------

def test_overrides_survive_quoting_for_every_launcher(launch, tmp_path):
  tpu = lines(launch('tpu_vm', *TPU_ARGS, CONFIG, 'gs://b/r', *TRICKY, '--dry-run'))
  assert train_words(shlex.split(command_payload(tpu[2])))[-3:] == TRICKY
  job = lines(launch('slurm', '--nodes=2', '--gpus_per_node=8', f'--venv={tmp_path}',
                     CONFIG, 'w', *TRICKY, '--dry-run'))
  srun = next(line for line in job if line.startswith('srun '))
  assert train_words(shlex.split(shlex.split(srun)[-1]))[-3:] == TRICKY
  assert local_train(launch, *TRICKY)[-3:] == TRICKY


def test_overrides_keep_their_order_around_launcher_flags(launch):
  words = shlex.split(lines(launch(
      'local', CONFIG, 'w', '--config.a=1', '--port=1234', '--config.b', '2', '--dry-run',
      '--', '--config.c=3', '--dry-run'))[0])
  assert words[-5:] == ['--config.a=1', '--config.b', '2', '--config.c=3', '--dry-run']


def test_shell_expressions_are_double_quoted_and_plain_words_single_quoted():
  line = common.join(['echo', common.ShellExpr('--id=$SLURM_PROCID'), '$HOME', 'a"b'])
  assert line == 'echo "--id=$SLURM_PROCID" \'$HOME\' \'a"b\''
  result = subprocess.run(['bash', '-c', line], env={'SLURM_PROCID': '5', 'HOME': '/h'},
                          capture_output=True, text=True)
  assert result.stdout == '--id=5 $HOME a"b\n'


# --- local --------------------------------------------------------------------------------------

def test_local_two_processes_share_a_loopback_coordinator(launch):
  result = launch('local', '--num_processes=2', '--devices_per_process=4', CONFIG, 'runs/mp',
                  '--config.train.steps=3', '--dry-run')
  out = lines(result)
  assert len(out) == 2
  addresses, ids = set(), []
  for line in out:
    words = shlex.split(line)
    env = dict(w.split('=', 1) for w in words[:words.index(sys.executable)])
    assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
    flags = dict(w[2:].split('=', 1) for w in words if w.startswith('--'))
    assert env['JAX_COORDINATOR_BIND_ADDRESS'] == flags['coordinator_address']
    addresses.add(flags['coordinator_address'])
    ids.append(flags['process_id'])
    assert flags['num_processes'] == '2' and words[-1] == '--config.train.steps=3'
  assert ids == ['0', '1']
  (address,) = addresses
  host, port = address.rsplit(':', 1)
  assert host == '127.0.0.1' and 0 < int(port) < 65536
  assert 'concurrently' in result.stderr


def test_local_port_flag_and_xla_flags_merge(launch):
  out = lines(launch('local', '--num_processes=3', '--port=23456', '--devices_per_process=2',
                     CONFIG, 'w', '--dry-run',
                     env={'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8'}))
  assert len(out) == 3
  for i, line in enumerate(out):
    words = shlex.split(line)
    assert words[0] == 'XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=2'
    assert '--coordinator_address=127.0.0.1:23456' in words
    assert f'--process_id={i}' in words


def test_local_single_process_has_no_distributed_flags(launch):
  (line,) = lines(launch('local', CONFIG, 'runs/q', '--dry-run'))
  assert shlex.split(line) == [sys.executable, '-m', 'jaxformer.train', f'--config={CONFIG}',
                               '--workdir=runs/q']


def test_dry_run_starts_no_subprocess(monkeypatch, capsys, tmp_path):
  def forbidden(*args, **kwargs):
    raise AssertionError(f'subprocess started in --dry-run: {args}')

  for name in ('run', 'Popen', 'call', 'check_call', 'check_output'):
    monkeypatch.setattr(subprocess, name, forbidden)
  monkeypatch.setattr(os, 'system', forbidden)
  assert local.main(['--num_processes=2', CONFIG, 'w', '--dry-run']) == 0
  assert tpu_vm.main([*TPU_ARGS, CONFIG, 'gs://b/r', '--dry-run']) == 0
  assert slurm.main(['--nodes=2', '--gpus_per_node=8', f'--venv={tmp_path}', '--install',
                     f'--repo_dir={tmp_path}', '--submit', '--script_path',
                     str(tmp_path / 'x.sbatch'), CONFIG, 'w', '--dry-run']) == 0
  assert not (tmp_path / 'x.sbatch').exists()
  out = capsys.readouterr().out
  assert out.count('jaxformer.train') == 4 and 'sbatch ' in out


def test_local_single_process_runs_with_check(monkeypatch):
  calls = []
  monkeypatch.setattr(subprocess, 'run',
                      lambda argv, **kw: calls.append((argv, kw)) or
                      subprocess.CompletedProcess(argv, 0))
  assert local.main(['--devices_per_process=2', CONFIG, 'w', '--config.x=1']) == 0
  ((argv, kw),) = calls
  assert kw['check'] is True
  assert argv == common.train_command(CONFIG, 'w', ['--config.x=1'], python=sys.executable)
  assert kw['env']['XLA_FLAGS'].endswith('--xla_force_host_platform_device_count=2')


def _py(code):
  return common.Command.of([sys.executable, '-c', code])


def test_run_parallel_prefixes_output_and_succeeds(capfd):
  code = local.run_parallel([_py('print("hello"); print("bye")'), _py('print("hi")')])
  assert code == 0
  out = capfd.readouterr().out.splitlines()
  assert sorted(out) == ['[p0] bye', '[p0] hello', '[p1] hi']


def test_run_parallel_stops_the_others_when_one_fails(capfd):
  start = time.monotonic()
  code = local.run_parallel([_py('import time; print("up", flush=True); time.sleep(60)'),
                             _py('import sys; print("boom"); sys.exit(7)')])
  assert code == 7
  assert time.monotonic() - start < 30
  captured = capfd.readouterr()
  assert '[p1] boom' in captured.out
  assert 'process 1 exited with status 7' in captured.err
