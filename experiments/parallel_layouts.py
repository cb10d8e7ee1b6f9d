"""Memory and communication of each parallel layout, read from compiled programs (issue 10).

    python experiments/parallel_layouts.py                 # ~100M LLaMA shape on 8 CPU devices
    python experiments/parallel_layouts.py --tiny --out runs/layouts.csv

For each layout (dp8, fsdp8, tp8, dp2 x fsdp2 x tp2, fsdp4 x tp2 with sequence parallelism) the
train step of one LLaMA-style model is compiled (never run) on 8 simulated devices
(`jaxformer.parallel.plan`), and per device we record:
  param_bytes, opt_bytes  parameters and optimizer state, from the arrays' shardings
  temp_bytes              XLA's temporaries (activations, gathered weights, gradients in flight)
  <kind>_bytes            buffer bytes of each collective kind per step (jaxformer.parallel.hlo:
                          the whole buffer a collective is about, loops counted by trip count)
and set them beside the textbook volume for that layout (fp32, B rows of T tokens, L layers,
P parameter bytes, D model width, mesh data x fsdp x tensor = d x f x t):
  data parallel    one all-reduce of the gradients: P / (f t) per device
  FSDP (ZeRO-3)    weights gathered for the forward and again for the backward, gradients
                   reduce-scattered: 3 P / t
  tensor parallel  4 all-reduces of the [B / (d f), T, D] activations per layer (2 forward,
                   2 backward; Megatron): 16 L B T D / (d f)
The ratio measured / textbook is what the README reports; docs/benchmarks.md explains where XLA
departs from the textbook schedule. `layer_param_bytes` (the scanned layers' weights, unsharded)
is what FSDP must gather twice and reduce once. Compiling all five layouts of the default shape
takes about half a minute on 2 CPU cores. Writes the CSV to --out, a bar chart next to it
(.png) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

LAYOUTS = {
    'dp8': dict(preset='dp', mesh={'data': 8}),
    'fsdp8': dict(preset='fsdp', mesh={'data': 1, 'fsdp': 8}),
    'tp8': dict(preset='tp', mesh={'data': 1, 'tensor': 8}),
    'dp2_fsdp2_tp2': dict(preset='dp_fsdp_tp', mesh={'data': 2, 'fsdp': 2, 'tensor': 2}),
    'fsdp4_tp2_sp': dict(preset='fsdp_tp', mesh={'data': 1, 'fsdp': 4, 'tensor': 2},
                         sequence_parallel=True),
}
# ~100M parameters: d 768, 12 layers, 16 / 8 heads of 48 (every layout of 8 divides them).
SHAPES = {
    'llama100m': dict(d=768, layers=12, heads=16, kv=8, head_dim=48, ffn=2048, vocab=32768,
                      seq=1024, batch=8),
    'tiny': dict(d=64, layers=2, heads=8, kv=8, head_dim=8, ffn=128, vocab=512, seq=32, batch=8),
}
KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
FIELDS = ('layout', 'mesh', 'params', 'layer_param_bytes', 'param_bytes', 'opt_bytes', 'temp_bytes',
          *(k.replace('-', '_') + '_bytes' for k in KINDS), 'collective_bytes', 'traffic_bytes',
          'textbook_bytes', 'ratio', 'backend')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tiny', action='store_true', help='a tiny model (tests, a quick look)')
  p.add_argument('--layouts', default=','.join(LAYOUTS))
  p.add_argument('--out', default='experiments/results/parallel_layouts.csv')
  return p.parse_args(argv)


def config(shape: dict, parallel: dict):
  from jaxformer.models import family_dict
  from jaxformer.train.experiment import default_config
  model = family_dict('llama', vocab_size=shape['vocab'], d_model=shape['d'],
                      num_layers=shape['layers'], max_length=shape['seq'],
                      attention=dict(num_heads=shape['heads'], num_kv_heads=shape['kv'],
                                     head_dim=shape['head_dim']),
                      ffn=dict(hidden_dim=shape['ffn']))
  return default_config(model=model, data=dict(name='python_stdlib', task='lm',
                                                seq_len=shape['seq']),
                        train=dict(batch_size=shape['batch']), parallel=parallel)


def textbook(shape: dict, mesh: dict, param_bytes: float) -> float:
  """Collective buffer bytes per step of the textbook layout (see the module docstring)."""
  d, f, t = mesh['data'], mesh['fsdp'], mesh['tensor']
  total = 0.0
  if d > 1:
    total += param_bytes / (f * t)
  if f > 1:
    total += 3 * param_bytes / t
  if t > 1:
    rows = shape['batch'] / (d * f)
    total += 4 * shape['layers'] * rows * shape['seq'] * shape['d'] * 4
  return total


def measure(name: str, shape: dict) -> dict:
  import jax
  from jaxformer.parallel.plan import plan
  p = plan(config(shape, LAYOUTS[name]))
  mesh = p['mesh_shape']
  layers = sum(r['bytes'] * _shards(r) for r in p['parameters'] if r['path'].startswith('stack/'))
  row = {'layout': name, 'mesh': p['mesh'].split(' (')[0], 'params': p['num_params'],
         'layer_param_bytes': layers,
         'param_bytes': p['param_bytes'], 'opt_bytes': p['opt_bytes'],
         'temp_bytes': p['memory']['temp'], 'backend': jax.default_backend()}
  for kind in KINDS:
    row[kind.replace('-', '_') + '_bytes'] = int(p['collectives'][kind]['buffer_bytes'])
  row['collective_bytes'] = sum(int(v['buffer_bytes']) for v in p['collectives'].values())
  row['traffic_bytes'] = int(sum(v['traffic_bytes'] for v in p['collectives'].values()))
  row['textbook_bytes'] = int(textbook(shape, mesh, p['param_bytes_unsharded']))
  row['ratio'] = round(row['collective_bytes'] / max(row['textbook_bytes'], 1), 3)
  return row


def _shards(row) -> int:
  """How many pieces a parameter row of the plan is cut into (unsharded bytes / per-device)."""
  whole, piece = 1, 1
  for a, b in zip(row['shape'], row['shard']):
    whole, piece = whole * a, piece * b
  return whole // piece


def plot(rows, png, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  names = [r['layout'] for r in rows]
  x = np.arange(len(rows))
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  mib = lambda v: np.asarray(v, float) / 2**20  # noqa: E731
  bottom = np.zeros(len(rows))
  for key, label in (('param_bytes', 'parameters'), ('opt_bytes', 'optimizer state'),
                     ('temp_bytes', 'temporaries')):
    vals = mib([r[key] for r in rows])
    a.bar(x, vals, bottom=bottom, label=label)
    bottom += vals
  a.set_xticks(x, names, rotation=20)
  a.set_ylabel('MiB per device')
  a.set_title('memory per device (compiled train step)')
  a.legend()
  w = 0.4
  b.bar(x - w / 2, mib([r['collective_bytes'] for r in rows]), w, label='measured (HLO)')
  b.bar(x + w / 2, mib([r['textbook_bytes'] for r in rows]), w, label='textbook')
  b.set_xticks(x, names, rotation=20)
  b.set_ylabel('MiB per step (collective buffers)')
  b.set_title('communication per step')
  b.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)


def table(rows) -> str:
  from jaxformer.parallel.hlo import human
  lines = ['| layout | params + optimizer / device | temporaries / device | collectives / step '
           '| textbook | measured / textbook |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["layout"]} | {human(r["param_bytes"] + r["opt_bytes"])} | '
                 f'{human(r["temp_bytes"])} | {human(r["collective_bytes"])} | '
                 f'{human(r["textbook_bytes"])} | {r["ratio"]:.2f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  from jaxformer.parallel.plan import simulate_devices
  simulate_devices(8)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import benchlib  # experiments/benchlib.py
  import jax
  if jax.device_count() != 8:
    raise SystemExit(f'needs 8 devices, found {jax.device_count()} (JAX started before the '
                     'device count could be set?)')
  shape = SHAPES['tiny' if args.tiny else 'llama100m']
  rows = []
  for name in args.layouts.split(','):
    rows.append(measure(name, shape))
    print(rows[-1], flush=True)
  title = (f'LLaMA {rows[0]["params"] / 1e6:.0f}M params, batch {shape["batch"]} x '
           f'{shape["seq"]}, fp32, 8 simulated devices ({rows[0]["backend"]})')
  benchlib.write_outputs(rows, FIELDS, args.out, plot, title, table(rows))
  return rows


if __name__ == '__main__':
  main()
