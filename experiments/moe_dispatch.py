"""MoE dispatchers versus the number of experts: forward + backward time and FLOPs (D5).

    python experiments/moe_dispatch.py                          # E = 8, 32, 64; top-2
    python experiments/moe_dispatch.py --experts 8,16 --length 512 --out runs/moe.csv

One `MoE` layer (top-k router, SwiGLU experts of width --ffn) is built for every E and every
`model.moe.dispatch` ('dense', 'capacity', 'ragged'; `jaxformer.layers.moe_dispatch`), with the
same weights, and measured side by side in one run. One measurement: the jitted gradient of
sum(y ** 2) + the two router losses with respect to the layer's parameters and its input
x [B, T, D].
  seconds  median wall time of --repeats calls after one warm-up call (which compiles), each
           ended by `block_until_ready`.
  flops    XLA's count for that executable, `jax.jit(...).lower(...).compile().cost_analysis()`
           ['flops'] (what the compiled program does, gathers and sorts not counted as FLOPs).
The expert FFN of a sparse kernel costs 2 * 3 * N * k * D * F FLOPs forward (N = B * T tokens,
3 matrices); dense runs E experts instead of k, capacity runs E * C * B slots (C =
ceil(capacity_factor * k * T / E)), and ragged runs N * k rows only when `ragged_dot` lowers
to a grouped kernel (XLA:CPU may expand it, which the FLOP column shows).
Writes the CSV (experts, top_k, dispatch, status, seconds, flops, speedup_vs_dense = dense
seconds / seconds, flops_ratio_vs_dense, backend, device) to --out, a plot next to it (.png),
and prints a markdown table. Timings mean something only on an otherwise idle machine; ratios
only within one run.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import MoE

import benchlib  # experiments/benchlib.py, next to this script

DISPATCHES = ('dense', 'capacity', 'ragged')
FIELDS = ('experts', 'top_k', 'dispatch', 'status', 'seconds', 'flops', 'speedup_vs_dense',
          'flops_ratio_vs_dense', 'backend', 'device')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--experts', default='8,32,64')
  p.add_argument('--top-k', type=int, default=2)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--length', type=int, default=256)
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--ffn', type=int, default=256)
  p.add_argument('--capacity-factor', type=float, default=1.25)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--out', default='experiments/results/moe_dispatch.csv')
  return p.parse_args(argv)


def build_step(experts: int, dispatch: str, args):
  """(compiled gradient step, its arguments) for one MoE layer."""
  cfg = ModelConfig.from_dict({
      'd_model': args.d_model, 'ffn': {'gated': True, 'activation': 'silu', 'bias': False,
                                       'hidden_dim': args.ffn},
      'moe': {'num_experts': experts, 'top_k': args.top_k, 'dispatch': dispatch,
              'capacity_factor': args.capacity_factor}})
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    y, aux = m(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux['load_balance_loss'] + aux['router_z_loss']

  x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.d_model), jnp.float32)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step.lower(params, x).compile(), (params, x)


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost.get('flops', 0.0))


def measure(experts: int, dispatch: str, args) -> dict:
  row = dict(experts=experts, top_k=args.top_k, dispatch=dispatch, status='ok', seconds='',
             flops='')
  try:
    compiled, inputs = build_step(experts, dispatch, args)
    row['flops'] = flops_of(compiled)
    row['seconds'] = benchlib.median_seconds(compiled, *inputs, repeats=args.repeats)
  except Exception as e:  # pylint: disable=broad-except
    print(f'  {dispatch} E={experts} failed: {type(e).__name__}: {e}', file=sys.stderr)
    return dict(row, status='oom' if benchlib.is_oom(e) else 'error')
  return row


def add_ratios(rows: list[dict]) -> None:
  benchlib.add_ratios(rows, lambda r: r['experts'], lambda r: r['dispatch'] == 'dense',
                      {'speedup_vs_dense': ('seconds', True),
                       'flops_ratio_vs_dense': ('flops', False)})


def markdown_table(rows: list[dict]) -> str:
  lines = ['speedup = dense time / time; FLOPs from XLA cost_analysis of the fwd+bwd step', '',
           '| E | k | dispatch | fwd+bwd ms | speedup vs dense | GFLOP | FLOPs vs dense |',
           '|---:|---:|---|---:|---:|---:|---:|']
  for r in rows:
    if r['status'] != 'ok':
      lines.append(f"| {r['experts']} | {r['top_k']} | {r['dispatch']} | {r['status']} | | | |")
      continue
    fmt = lambda v, f: '' if v == '' else format(v, f)  # noqa: E731  (no dense baseline)
    lines.append(f"| {r['experts']} | {r['top_k']} | {r['dispatch']} | "
                 f"{1e3 * r['seconds']:.2f} | {fmt(r['speedup_vs_dense'], '.2f')} | "
                 f"{r['flops'] / 1e9:.3f} | {fmt(r['flops_ratio_vs_dense'], '.3f')} |")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for dispatch in DISPATCHES:
    ok = [r for r in rows if r['dispatch'] == dispatch and r['status'] == 'ok']
    if not ok:
      continue
    style = dict(color='black', linewidth=2.5) if dispatch == 'dense' else {}
    e = [r['experts'] for r in ok]
    axes[0].plot(e, [r['seconds'] for r in ok], 'o-', label=dispatch, **style)
    axes[1].plot(e, [r['flops'] / 1e9 for r in ok], 'o-', label=dispatch, **style)
  for ax, ylabel in zip(axes, ('forward + backward time (s)', 'GFLOP (XLA cost analysis)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('experts E')
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
  axes[1].legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  device = jax.devices()[0]
  backend, device_kind = jax.default_backend(), device.device_kind
  rows = []
  for experts in [int(e) for e in args.experts.split(',')]:
    for dispatch in DISPATCHES:
      row = dict(measure(experts, dispatch, args), backend=backend, device=device_kind)
      rows.append(row)
      secs = f"{1e3 * row['seconds']:.2f} ms" if row['seconds'] != '' else ''
      print(f"{dispatch} E={experts}: {row['status']} {secs}", flush=True)
  add_ratios(rows)
  benchlib.write_outputs(rows, FIELDS, args.out, plot,
                         f'MoE fwd+bwd, top-{args.top_k}, B={args.batch}, T={args.length}, '
                         f'D={args.d_model}, F={args.ffn}, capacity factor '
                         f'{args.capacity_factor}, {backend} ({device_kind})',
                         markdown_table(rows))
  return rows


if __name__ == '__main__':
  main()
