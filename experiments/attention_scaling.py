"""Attention kinds versus sequence length: forward + backward time and peak memory (issue 4).

    python experiments/attention_scaling.py                       # every kind, 512 .. 16k
    python experiments/attention_scaling.py --kinds local,linear,performer --lengths 1024,4096
    python experiments/attention_scaling.py --causal --max-gib 20 --out runs/scaling_causal.csv

Each registered (kind, impl) (or the --kinds subset; a name alone means every impl of it) is
built inside the `Attention` layer (projections included) with its registry defaults, plus any
`--option kind.key=value`, at every length n, and timed side by side with the dense
'dot_product' / 'xla' core in the same run. One measurement: the jitted gradient of
sum(y ** 2) with respect to the layer's parameters and its input x [B, n, heads * head_dim].
  seconds     median wall time of --repeats calls after one warm-up call (which compiles),
              each ended by `block_until_ready`.
  peak_bytes  XLA's static buffer assignment of that executable, `memory_analysis()`:
              temp_size_in_bytes + argument_size_in_bytes (inputs and parameters), i.e. what
              the step needs beyond its outputs; not a runtime allocator reading.
A length is 'skipped' without compiling for a kind that is not `subquadratic` when the dense
n x n float32 scores, B * heads * n * n * 4 bytes, exceed --max-gib, and after compiling for
any kind whose peak_bytes exceed it; an out-of-memory at run time is recorded as 'oom', a kind
that refuses the setting (e.g. Linformer with --causal) as 'unsupported', any other failure as
'error' (the message goes to stderr and the run goes on).
Writes the CSV (kind, impl, length, status, seconds, peak_bytes, speedup_vs_dense =
dense seconds / seconds, memory_ratio_vs_dense = peak_bytes / dense peak_bytes, backend,
device) to --out, a log-log plot of both quantities next to it (same name, .png), and prints a
markdown table of the ratios at n = 4096 (or the longest length measured for dense).
Timings mean something only on an otherwise idle machine; ratios only within one run.
"""

from __future__ import annotations

import argparse
import ast
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, registry
from jaxformer.config import ConfigError, ModelConfig

import benchlib  # experiments/benchlib.py, next to this script

DENSE = ('dot_product', 'xla')
FIELDS = ('kind', 'impl', 'length', 'status', 'seconds', 'peak_bytes', 'speedup_vs_dense',
          'memory_ratio_vs_dense', 'backend', 'device')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--lengths', default='512,1024,2048,4096,8192,16384')
  p.add_argument('--kinds', default='', help='comma-separated kind or kind/impl (default: all)')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head-dim', type=int, default=64)
  p.add_argument('--causal', action='store_true', help='causal layers (kinds without it skip)')
  p.add_argument('--max-gib', type=float, default=16.0, help='memory budget per measurement')
  p.add_argument('--option', action='append', default=[], metavar='KIND.KEY=VALUE',
                 help='a registry option for one kind, e.g. local.block_size=128 (repeatable)')
  p.add_argument('--out', default='experiments/results/attention_scaling.csv')
  return p.parse_args(argv)


def selected_entries(kinds: str) -> list[tuple[str, str]]:
  """The requested (kind, impl) pairs, dense first."""
  entries = registry.entries()
  if kinds:
    wanted = []
    for name in kinds.split(','):
      kind, _, impl = name.strip().partition('/')
      match = [e for e in entries if e[0] == kind and (not impl or e[1] == impl)]
      if not match:
        raise SystemExit(f'--kinds: {name!r} is not registered; registered: '
                         f'{[f"{k}/{i}" for k, i in entries]}')
      wanted += match
    entries = sorted(set(wanted))
  return [DENSE] + [e for e in entries if e != DENSE]


def parse_options(items: list[str]) -> dict[str, dict]:
  out: dict[str, dict] = {}
  for item in items:
    key, sep, value = item.partition('=')
    kind, dot, name = key.partition('.')
    if not (sep and dot and name):
      raise SystemExit(f'--option {item!r} is invalid: expected KIND.KEY=VALUE')
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    out.setdefault(kind, {})[name] = parsed
  return out


def build_step(kind: str, impl: str, n: int, args, options: dict):
  """(compiled gradient step, its arguments) for one kind at length n."""
  d = args.heads * args.head_dim
  cfg = ModelConfig.from_dict({
      'd_model': d, 'max_length': n, 'position': {'kind': 'none'},
      'attention': {'kind': kind, 'impl': impl, 'num_heads': args.heads,
                    'head_dim': args.head_dim, 'options': options}})
  layer = Attention(cfg, causal=args.causal, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return jnp.sum(m(x, AttentionMask())[0].astype(jnp.float32) ** 2)

  x = jax.random.normal(jax.random.key(0), (args.batch, n, d), jnp.float32)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step.lower(params, x).compile(), (params, x)


def measure(kind: str, impl: str, n: int, args, options: dict) -> dict:
  """One row: status and, when measured, seconds and peak_bytes."""
  row = dict(kind=kind, impl=impl, length=n, status='ok', seconds='', peak_bytes='')
  budget = args.max_gib * 2 ** 30
  subquadratic = getattr(registry.lookup(kind, impl), 'subquadratic', False)
  if not subquadratic and args.batch * args.heads * n * n * 4 > budget:
    return dict(row, status='skipped')
  try:
    compiled, inputs = build_step(kind, impl, n, args, options)
  except ConfigError as e:  # a feature the kind refuses, e.g. Linformer with --causal
    print(f'  {kind}/{impl}: {e}', file=sys.stderr)
    return dict(row, status='unsupported')
  except Exception as e:  # pylint: disable=broad-except
    print(f'  {kind}/{impl} n={n} failed to build: {type(e).__name__}: {e}', file=sys.stderr)
    return dict(row, status='error')
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes
  row['peak_bytes'] = peak
  if peak > budget:
    return dict(row, status='skipped')
  try:
    row['seconds'] = benchlib.median_seconds(compiled, *inputs, repeats=args.repeats)
  except Exception as e:  # pylint: disable=broad-except
    if benchlib.is_oom(e):
      return dict(row, status='oom')
    print(f'  {kind}/{impl} n={n} failed to run: {type(e).__name__}: {e}', file=sys.stderr)
    return dict(row, status='error')
  return row


def add_ratios(rows: list[dict]) -> None:
  benchlib.add_ratios(rows, lambda r: r['length'], lambda r: (r['kind'], r['impl']) == DENSE,
                      {'speedup_vs_dense': ('seconds', True),
                       'memory_ratio_vs_dense': ('peak_bytes', False)})


def markdown_table(rows: list[dict]) -> str:
  dense_lengths = [r['length'] for r in rows
                   if (r['kind'], r['impl']) == DENSE and r['status'] == 'ok']
  if not dense_lengths:
    return '(dense attention was not measured at any length: no ratios)'
  n = 4096 if 4096 in dense_lengths else max(dense_lengths)
  lines = [f'Ratios at n = {n} (speedup = dense time / time; memory = peak / dense peak)', '',
           '| kind | impl | fwd+bwd ms | speedup vs dense | memory vs dense |',
           '|---|---|---:|---:|---:|']
  for r in rows:
    if r['length'] != n:
      continue
    if r['status'] != 'ok':
      lines.append(f"| {r['kind']} | {r['impl']} | {r['status']} | | |")
      continue
    lines.append(f"| {r['kind']} | {r['impl']} | {1e3 * r['seconds']:.2f} | "
                 f"{r['speedup_vs_dense']:.2f} | {r['memory_ratio_vs_dense']:.3f} |")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  names = sorted({(r['kind'], r['impl']) for r in rows}, key=lambda e: (e != DENSE, e))
  for kind, impl in names:
    ok = [r for r in rows if (r['kind'], r['impl']) == (kind, impl) and r['status'] == 'ok']
    if not ok:
      continue
    style = dict(color='black', linewidth=2.5) if (kind, impl) == DENSE else {}
    label = kind if impl == 'xla' else f'{kind}/{impl}'
    lengths = [r['length'] for r in ok]
    axes[0].plot(lengths, [r['seconds'] for r in ok], 'o-', label=label, **style)
    axes[1].plot(lengths, [r['peak_bytes'] / 2 ** 20 for r in ok], 'o-', label=label, **style)
  for ax, ylabel in zip(axes, ('forward + backward time (s)', 'peak memory (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  args = parse_args(argv)
  lengths = [int(n) for n in args.lengths.split(',')]
  options = parse_options(args.option)
  entries = selected_entries(args.kinds)
  device = jax.devices()[0]
  backend, device_kind = jax.default_backend(), device.device_kind
  rows = []
  for kind, impl in entries:
    for n in lengths:
      row = measure(kind, impl, n, args, options.get(kind, {}))
      rows.append(dict(row, backend=backend, device=device_kind))
      secs = f"{1e3 * row['seconds']:.2f} ms" if row['seconds'] != '' else ''
      print(f'{kind}/{impl} n={n}: {row["status"]} {secs}', flush=True)
  add_ratios(rows)
  benchlib.write_outputs(rows, FIELDS, args.out, plot,
                         f'attention fwd+bwd, B={args.batch}, {args.heads} heads x '
                         f'{args.head_dim}, {"causal" if args.causal else "bidirectional"}, '
                         f'{backend} ({device_kind})', markdown_table(rows))


if __name__ == '__main__':
  main()
