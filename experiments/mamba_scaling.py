"""Mamba versus dense attention along the sequence length: forward + backward time and memory
(CATALOG D10; a sibling of attention_scaling.py).

    python experiments/mamba_scaling.py                         # 512 .. 16k
    python experiments/mamba_scaling.py --quick                 # 512 .. 4096, 3 repeats
    python experiments/mamba_scaling.py --lengths 1024,4096 --d-model 256 --scan sequential

Two layers of the same width D, each timed at every length n: the causal dense attention layer
('dot_product' / 'xla', `--heads` heads, projections included) and the Mamba layer
(jaxformer.layers.mamba; inner width `--expand` * D, state `--d-state`, `--scan` associative or
sequential). One measurement: the jitted gradient of sum(y ** 2) with respect to the layer's
parameters and its input x [B, n, D].
  seconds     median wall time of --repeats calls after one warm-up call (which compiles).
  cpu_seconds median process CPU time (all threads) of the same calls: on a shared machine it
              moves far less with the other processes' load than the wall time does.
  peak_bytes  XLA's static buffer assignment of that executable, `memory_analysis()`:
              temp_size_in_bytes + argument_size_in_bytes; not a runtime allocator reading.
  growth_*    the local exponent log(v_n / v_m) / log(n / m) against the previous length m
              (growth_cpu of cpu_seconds, growth_memory of peak_bytes): 1 is linear growth,
              2 quadratic.
Dense attention is 'skipped' at lengths where its n x n float32 scores (B * heads * n^2 * 4
bytes) exceed --max-gib; either layer is skipped after compiling when its peak exceeds it.
Writes the CSV (layer, length, status, seconds, cpu_seconds, peak_bytes, growth_cpu,
growth_memory, speedup_vs_dense (of cpu_seconds), memory_ratio_vs_dense, backend, device) to
--out and a log-log plot of CPU time and memory next to it (.png) with slope-1 and slope-2
guides. Timings mean something only on an idle machine;
ratios and growth only within one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import Attention, AttentionMask
from jaxformer.config import ModelConfig
from jaxformer.layers.mamba import Mamba

import benchlib  # experiments/benchlib.py, next to this script

LAYERS = ('dense_attention', 'mamba')
FIELDS = ('layer', 'length', 'status', 'seconds', 'cpu_seconds', 'peak_bytes', 'growth_cpu',
          'growth_memory', 'speedup_vs_dense', 'memory_ratio_vs_dense', 'backend', 'device')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--lengths', default='512,1024,2048,4096,8192,16384')
  p.add_argument('--quick', action='store_true', help='lengths 512..4096 and 3 repeats')
  p.add_argument('--layers', default=','.join(LAYERS), help='a subset of ' + ','.join(LAYERS))
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--d-state', type=int, default=16)
  p.add_argument('--expand', type=int, default=2)
  p.add_argument('--scan', default='associative', choices=('associative', 'sequential'))
  p.add_argument('--max-gib', type=float, default=8.0, help='memory budget per measurement')
  p.add_argument('--out', default='experiments/results/mamba_scaling.csv')
  args = p.parse_args(argv)
  args.layers = tuple(args.layers.split(','))
  if not set(args.layers) <= set(LAYERS):
    p.error(f'--layers={",".join(args.layers)!r}: allowed layers are {LAYERS}')
  if args.quick:
    args.lengths, args.repeats = '512,1024,2048,4096', 3
  return args


def build_step(layer_name: str, n: int, args):
  """(compiled gradient step, its arguments) for one layer at length n."""
  cfg = ModelConfig.from_dict({
      'd_model': args.d_model, 'max_length': n, 'position': {'kind': 'none'},
      'attention': {'num_heads': args.heads},
      'mamba': {'d_state': args.d_state, 'expand': args.expand, 'scan': args.scan}})
  if layer_name == 'mamba':
    layer = Mamba(cfg, rngs=nnx.Rngs(0))
    apply = lambda m, x: m(x)[0]  # noqa: E731
  else:
    layer = Attention(cfg, causal=True, rngs=nnx.Rngs(0))
    apply = lambda m, x: m(x, AttentionMask())[0]  # noqa: E731
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(apply(nnx.merge(graphdef, params, rest, copy=True), x) ** 2)

  x = jax.random.normal(jax.random.key(0), (args.batch, n, args.d_model), jnp.float32)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step.lower(params, x).compile(), (params, x)


def median_times(fn, *inputs, repeats: int) -> tuple[float, float]:
  """(median wall seconds, median process CPU seconds) of `repeats` calls after a warm-up."""
  jax.block_until_ready(fn(*inputs))
  wall, cpu = [], []
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*inputs))
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def measure(layer_name: str, n: int, args) -> dict:
  row = dict(layer=layer_name, length=n, status='ok', seconds='', cpu_seconds='', peak_bytes='')
  budget = args.max_gib * 2 ** 30
  if layer_name == 'dense_attention' and args.batch * args.heads * n * n * 4 > budget:
    return dict(row, status='skipped')
  compiled, inputs = build_step(layer_name, n, args)
  mem = compiled.memory_analysis()
  row['peak_bytes'] = mem.temp_size_in_bytes + mem.argument_size_in_bytes
  if row['peak_bytes'] > budget:
    return dict(row, status='skipped')
  try:
    row['seconds'], row['cpu_seconds'] = median_times(compiled, *inputs, repeats=args.repeats)
  except Exception as e:  # pylint: disable=broad-except
    if benchlib.is_oom(e):
      return dict(row, status='oom')
    raise
  return row


def add_growth(rows: list[dict]) -> None:
  """growth_* = log(v_n / v_m) / log(n / m) against the layer's previous measured length m."""
  for name in LAYERS:
    prev = None
    for r in (r for r in rows if r['layer'] == name):
      for field, out in (('cpu_seconds', 'growth_cpu'), ('peak_bytes', 'growth_memory')):
        ok = r['status'] == 'ok' and prev is not None
        r[out] = (math.log(r[field] / prev[field]) / math.log(r['length'] / prev['length'])
                  if ok else '')
      prev = r if r['status'] == 'ok' else prev


def table(rows: list[dict]) -> str:
  lines = ['| layer | n | fwd+bwd CPU ms | peak MiB | CPU time growth | memory growth | '
           'speedup vs dense | memory vs dense |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  fmt = lambda v, f: '' if v == '' else format(v, f)  # noqa: E731
  for r in rows:
    if r['status'] != 'ok':
      lines.append(f"| {r['layer']} | {r['length']} | {r['status']} | | | | | |")
      continue
    lines.append(f"| {r['layer']} | {r['length']} | {1e3 * r['cpu_seconds']:.1f} | "
                 f"{r['peak_bytes'] / 2 ** 20:.1f} | {fmt(r['growth_cpu'], '.2f')} | "
                 f"{fmt(r['growth_memory'], '.2f')} | {fmt(r['speedup_vs_dense'], '.2f')} | "
                 f"{fmt(r['memory_ratio_vs_dense'], '.3f')} |")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, field, scale, ylabel in ((axes[0], 'cpu_seconds', 1.0,
                                    'forward + backward process CPU time (s)'),
                                   (axes[1], 'peak_bytes', 2 ** -20, 'peak memory (MiB)')):
    for name, style in zip(LAYERS, ('ks-', 'o-')):
      ok = [r for r in rows if r['layer'] == name and r['status'] == 'ok']
      if ok:
        ax.plot([r['length'] for r in ok], [r[field] * scale for r in ok], style, label=name)
    ok = [r for r in rows if r['layer'] == 'mamba' and r['status'] == 'ok']
    if ok:  # guides through Mamba's first point
      n0, v0 = ok[0]['length'], ok[0][field] * scale
      ns = [r['length'] for r in ok]
      ax.plot(ns, [v0 * n / n0 for n in ns], ':', color='gray', label='slope 1 (linear)')
      ax.plot(ns, [v0 * (n / n0) ** 2 for n in ns], '--', color='gray',
              label='slope 2 (quadratic)')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  lengths = [int(n) for n in args.lengths.split(',')]
  device = jax.devices()[0]
  rows = []
  for name in args.layers:
    for n in lengths:
      row = measure(name, n, args)
      rows.append(dict(row, backend=jax.default_backend(), device=device.device_kind))
      secs = (f"{1e3 * row['seconds']:.2f} ms wall, {1e3 * row['cpu_seconds']:.2f} ms CPU"
              if row['seconds'] != '' else '')
      print(f'{name} n={n}: {row["status"]} {secs}', file=sys.stderr, flush=True)
  add_growth(rows)
  benchlib.add_ratios(rows, lambda r: r['length'], lambda r: r['layer'] == 'dense_attention',
                      {'speedup_vs_dense': ('cpu_seconds', True),
                       'memory_ratio_vs_dense': ('peak_bytes', False)})
  benchlib.write_outputs(
      rows, FIELDS, args.out, plot,
      f'fwd+bwd of one layer, B={args.batch}, D={args.d_model}: causal dense attention '
      f'({args.heads} heads) vs Mamba (N={args.d_state}, expand {args.expand}, {args.scan} '
      f'scan), {jax.default_backend()} ({device.device_kind})', table(rows))
  return rows


if __name__ == '__main__':
  main()
