"""Compile time versus depth: with layers scanned (`nnx.scan`), compiling a 24-layer model should
cost about as much as a 2-layer one (issue 2 target: ratio <= 1.5).

    python experiments/compile_time.py [--out experiments/results]

Writes compile_time.csv and compile_time.png (seconds to lower + compile one training step,
forward + backward, for 2..24 layers, scanned and unrolled) and prints the 24/2 ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.models import build_model, family


def compile_seconds(num_layers: int, scan: bool, d_model: int = 256) -> float:
  cfg = family('llama', vocab_size=512, d_model=d_model, num_layers=num_layers,
               max_length=256, attention=dict(num_heads=4), scan_layers=scan)
  model = build_model(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = jnp.zeros((2, 128), jnp.int32)

  def loss(params):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.mean(m(toks).logits ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  step.lower(params).compile()
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--depths', default='2,4,8,12,24')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  depths = [int(d) for d in args.depths.split(',')]
  rows = []
  for scan in (True, False):
    for depth in depths:
      # Median of a few fresh compilations (each builds a new jitted function).
      times = sorted(compile_seconds(depth, scan) for _ in range(args.repeats))
      secs = times[len(times) // 2]
      rows.append(dict(layers=depth, scan=scan, compile_s=round(secs, 3)))
      print(f'layers={depth:3d} scan={scan!s:5} compile={secs:.2f}s', flush=True)
  path = os.path.join(args.out, 'compile_time.csv')
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['layers', 'scan', 'compile_s'])
    w.writeheader()
    w.writerows(rows)
  by = {(r['layers'], r['scan']): r['compile_s'] for r in rows}
  lo, hi = min(depths), max(depths)
  for scan in (True, False):
    print(f'scan={scan}: compile({hi} layers) / compile({lo} layers) = '
          f'{by[(hi, scan)] / by[(lo, scan)]:.2f}')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for scan in (True, False):
    ax.plot(depths, [by[(d, scan)] for d in depths], 'o-',
            label='nnx.scan' if scan else 'unrolled')
  ax.set_xlabel('layers')
  ax.set_ylabel('compile time of a train step (s)')
  ax.set_title(f'compile time vs depth ({jax.devices()[0].platform})')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'compile_time.png'), dpi=120)
  print('wrote', path)


if __name__ == '__main__':
  main()
