"""`python -m jaxformer.parallel.plan` and `train.profile_steps` (issue 10)."""

import os
import subprocess
import sys

from parallel_helpers import LAYOUTS, LLAMA, experiment, lm_batches, program

from jaxformer.parallel import hlo
from jaxformer.train.experiment import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA_CONFIG = os.path.join(ROOT, 'configs', 'llama.py')


def test_plan_command_prints_mesh_specs_bytes_memory_and_collectives():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  out = subprocess.run(
      [sys.executable, '-m', 'jaxformer.parallel.plan', f'--config={LLAMA_CONFIG}:size=tiny',
       '--num_devices=8', '--config.parallel.mesh.data=1', '--config.parallel.mesh.fsdp=8'],
      env=env, check=True, capture_output=True, text=True).stdout
  assert 'mesh: fsdp=8 (8 devices)' in out
  # The FFN input weight [L, D, F] = [2, 32, 64]: its model dimension split 8 ways.
  row = next(line for line in out.splitlines() if 'ffn/wi_gate' in line)
  assert "('layers', 'embed', 'mlp')" in row and "P(None, 'fsdp', None)" in row
  assert '(2, 32, 64)' in row and '(2, 4, 64)' in row
  assert 'parameter bytes per device:' in out and 'optimizer bytes per device:' in out
  assert 'temporaries' in out and 'all-gather' in out
  gathers = next(line for line in out.splitlines() if line.strip().startswith('all-gather'))
  assert int(gathers.split()[1]) > 0  # FSDP gathers weights


def test_plan_figures_match_the_textbook_for_fsdp_and_data_parallelism():
  """FSDP moves ~3x the parameter bytes per step (gather for the forward and again for the
  backward, one reduction of the gradients); data parallelism all-reduces the gradients once."""
  from jaxformer.parallel.plan import plan
  from jaxformer.train.experiment import default_config
  from jaxformer.models import family_dict
  for layout, expected in (('fsdp8', 3.0), ('dp8', 1.0)):
    cfg = default_config(model=family_dict('llama', **LLAMA),
                         data=dict(name='python_stdlib', task='lm', seq_len=16),
                         train=dict(batch_size=8), parallel=LAYOUTS[layout])
    p = plan(cfg)
    moved = sum(row['buffer_bytes'] for row in p['collectives'].values())
    ratio = moved / p['param_bytes_unsharded']
    assert abs(ratio - expected) < 0.25 * expected, (layout, ratio)


def test_profile_steps_write_a_trace(tmp_path):
  from jaxformer.train.trainer import Trainer
  c = load_config(LLAMA_CONFIG, 'size=tiny')
  c.train.update(steps=4, profile_steps=2, progress=False, sample_tokens=0, test_batches=0,
                 eval_every=1000, async_checkpoint=False)
  Trainer(c, str(tmp_path)).run()
  traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces
  assert all(os.path.getsize(f) > 0 for f in traces)


def test_collective_parser_counts_loop_bodies_by_trip_count():
  prog = program(experiment('llama', LLAMA, parallel=LAYOUTS['fsdp8']))
  text = prog.train_step.lower(prog.target(), prog.abstract_batch(lm_batches(1)[0])).compile(
  ).as_text()
  ops = hlo.collectives(text, 8)
  # Each of the 2 scanned layers gathers its weights: ops inside the layer loop run twice.
  assert any(op.kind == 'all-gather' and op.count == 2 for op in ops)
  assert all(op.group_size == 8 for op in ops if op.kind == 'all-gather')


def test_plan_of_a_pipeline_shards_layers_over_stages_and_permutes_activations():
  from jaxformer.parallel.plan import plan, render
  from jaxformer.train.experiment import default_config
  from jaxformer.models import family_dict
  cfg = default_config(model=family_dict('llama', **dict(LLAMA, num_layers=4)),
                       data=dict(name='python_stdlib', task='lm', seq_len=16),
                       train=dict(batch_size=8), optim=dict(grad_accum_steps=4),
                       parallel=dict(preset='dp', mesh={'stage': 4, 'data': 2}))
  p = plan(cfg)
  assert p['pipeline'] == {'stages': 4, 'microbatches': 4, 'repeats': 1, 'iterations': 7,
                           'bubble': 3 / 7}
  row = next(r for r in p['parameters'] if r['path'].endswith('ffn/wi_gate'))
  assert row['shape'][0] == 4 and row['shard'][0] == 1  # one layer per stage
  assert p['collectives']['collective-permute']['count'] > 0  # stage to stage
  assert 'pipeline: 4 stages, 4 micro-batches (GPipe); 7 iterations' in render(p)
