"""Exact-attention throughput: Pallas flash attention vs cuDNN vs XLA, in TFLOP/s (issue 5).

    python experiments/flash_benchmark.py                         # the GPU study, bf16
    python experiments/flash_benchmark.py --lengths 1024,4096 --head-dims 128 --causal true
    python experiments/flash_benchmark.py --cpu-smoke             # tiny shapes, interpret mode

The study of the FlashAttention papers: tokens per batch fixed (--tokens, default 16k, so
batch = tokens / L) and model width fixed (--width 2048, so heads = width / d), for every
L in --lengths (1k ... 16k), d in --head-dims (64, 128), causal and not, in --dtype (bf16).
Impls (--impls):
  pallas  jaxformer.kernels.flash_attention (Triton schedule on GPU, Mosaic on TPU)
  cudnn   jax.nn.dot_product_attention(implementation='cudnn') (NVIDIA GPUs only)
  xla     jaxformer's dense reference core, `attention.core.dot_product_attention`
each in two passes: 'fwd' (the output) and 'fwd+bwd' (the output and the gradients of
sum(out * g) with respect to q, k, v).

FLOP accounting (the FlashAttention convention, matmuls only):
  forward  = 4 * B * H * L^2 * d     (Q K^T and P V, 2 FLOPs per multiply-add),
             halved when causal (only the lower triangle is needed);
  backward = 2.5 * forward           (5 matmuls instead of 2), so fwd+bwd = 3.5 * forward.
TFLOP/s = FLOPs / median seconds of --repeats calls after a warm-up (which compiles). An
impl that cannot run a setting is recorded as 'unsupported', an out-of-memory as 'oom'.
Writes the CSV (impl, pass, length, head_dim, causal, dtype, batch, heads, status, seconds,
tflops, tflops_per_s, ratio_vs_cudnn, backend, device) to --out, a plot next to it (.png),
and prints a markdown table. Only GPU/TPU timings mean anything; on CPU the Pallas kernels run
in interpret mode, which checks that the script works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.kernels import flash_attention as fa

import benchlib  # experiments/benchlib.py, next to this script

FIELDS = ('impl', 'pass', 'length', 'head_dim', 'causal', 'dtype', 'batch', 'heads', 'status',
          'seconds', 'tflops', 'tflops_per_s', 'ratio_vs_cudnn', 'backend', 'device')
PASSES = ('fwd', 'fwd+bwd')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--lengths', default='1024,2048,4096,8192,16384')
  p.add_argument('--head-dims', default='64,128')
  p.add_argument('--causal', default='false,true', help='comma-separated booleans')
  p.add_argument('--impls', default='pallas,cudnn,xla')
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--tokens', type=int, default=16384, help='batch * length')
  p.add_argument('--width', type=int, default=2048, help='heads * head_dim')
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--block', action='append', default=[],
                 help='Pallas tile override, e.g. --block block_q=128 (repeatable)')
  p.add_argument('--cpu-smoke', action='store_true',
                 help='tiny shapes (L=64,128, d=64, 2 repeats) to check the script on CPU')
  p.add_argument('--out', default='runs/flash_benchmark.csv')
  if p.parse_known_args(argv)[0].cpu_smoke:  # explicit flags still win over these defaults
    p.set_defaults(lengths='64,128', head_dims='64', tokens=256, width=128, repeats=2)
  return p.parse_args(argv)


def flops(batch: int, heads: int, length: int, head_dim: int, causal: bool, pass_: str) -> float:
  fwd = 4.0 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
  return fwd if pass_ == 'fwd' else 3.5 * fwd


def attention_fn(impl: str, causal: bool, blocks: fa.BlockSizes | None):
  if impl == 'pallas':
    return lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, block_sizes=blocks)
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise NotImplementedError('cuDNN attention needs an NVIDIA GPU')
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation='cudnn')
  if impl == 'xla':
    mask = AttentionMask(causal=True) if causal else None
    return lambda q, k, v: dot_product_attention(q, k, v, mask)
  raise ValueError(f"--impls has {impl!r}: allowed values are ['pallas', 'cudnn', 'xla']")


def step_fn(attn, pass_: str):
  if pass_ == 'fwd':
    return jax.jit(attn)
  def loss(q, k, v, g):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * g)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, pass_, length, head_dim, causal, args, blocks) -> dict:
  batch, heads = max(1, args.tokens // length), args.width // head_dim
  row = dict(impl=impl, length=length, head_dim=head_dim, causal=causal, dtype=args.dtype,
             batch=batch, heads=heads, status='ok', seconds='', tflops='', tflops_per_s='')
  row['pass'] = pass_
  dtype = jnp.dtype(args.dtype)
  ks = jax.random.split(jax.random.key(0), 4)
  shape = (batch, length, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in ks[:3])
  inputs = (q, k, v) if pass_ == 'fwd' else (q, k, v, jax.random.normal(ks[3], shape))
  try:
    fn = step_fn(attention_fn(impl, causal, blocks), pass_)
    row['seconds'] = benchlib.median_seconds(fn, *inputs, repeats=args.repeats)
  except NotImplementedError as e:
    print(f'  {impl}: {e}', file=sys.stderr)
    return dict(row, status='unsupported')
  except Exception as e:  # pylint: disable=broad-except
    if benchlib.is_oom(e):
      return dict(row, status='oom')
    print(f'  {impl} {pass_} L={length} d={head_dim} failed: {type(e).__name__}: {e}',
          file=sys.stderr)
    return dict(row, status='error')
  row['tflops'] = flops(batch, heads, length, head_dim, causal, pass_) / 1e12
  row['tflops_per_s'] = row['tflops'] / row['seconds']
  return row


def add_ratios(rows: list[dict]) -> None:
  benchlib.add_ratios(rows, lambda r: (r['pass'], r['length'], r['head_dim'], r['causal']),
                      lambda r: r['impl'] == 'cudnn', {'ratio_vs_cudnn': ('tflops_per_s', False)})


def markdown_table(rows: list[dict]) -> str:
  impls = sorted({r['impl'] for r in rows})
  lines = ['TFLOP/s (ratio to cuDNN in brackets where cuDNN ran)', '',
           '| pass | causal | d | L | ' + ' | '.join(impls) + ' |',
           '|---|---|---:|---:|' + '---:|' * len(impls)]
  groups = sorted({(r['pass'], r['causal'], r['head_dim'], r['length']) for r in rows})
  for g in groups:
    cells = []
    for impl in impls:
      r = next(x for x in rows if x['impl'] == impl
               and (x['pass'], x['causal'], x['head_dim'], x['length']) == g)
      if r['status'] != 'ok':
        cells.append(r['status'])
      else:
        ratio = f" ({r['ratio_vs_cudnn']:.2f})" if r['ratio_vs_cudnn'] != '' else ''
        cells.append(f"{r['tflops_per_s']:.3g}{ratio}")
    lines.append(f'| {g[0]} | {g[1]} | {g[2]} | {g[3]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = sorted({(r['pass'], r['causal'], r['head_dim']) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
  for ax, (pass_, causal, d) in zip(axes[0], panels):
    for impl in sorted({r['impl'] for r in rows}):
      ok = [r for r in rows if (r['impl'], r['pass'], r['causal'], r['head_dim'])
            == (impl, pass_, causal, d) and r['status'] == 'ok']
      if ok:
        ax.plot([r['length'] for r in ok], [r['tflops_per_s'] for r in ok], 'o-', label=impl)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('sequence length')
    ax.set_ylabel('TFLOP/s')
    ax.set_title(f"{pass_}, {'causal' if causal else 'bidirectional'}, d={d}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  blocks = None
  if args.block:
    sizes = dict(item.split('=') for item in args.block)
    blocks = fa.BlockSizes(**{k: int(v) for k, v in sizes.items()})
  device = jax.devices()[0]
  backend, device_kind = jax.default_backend(), device.device_kind
  rows = []
  for causal in [c.strip().lower() == 'true' for c in args.causal.split(',')]:
    for d in [int(x) for x in args.head_dims.split(',')]:
      for n in [int(x) for x in args.lengths.split(',')]:
        for impl in args.impls.split(','):
          for pass_ in PASSES:
            row = dict(measure(impl, pass_, n, d, causal, args, blocks), backend=backend,
                       device=device_kind)
            rows.append(row)
            rate = f"{row['tflops_per_s']:.3g} TFLOP/s" if row['status'] == 'ok' else ''
            print(f"{impl} {pass_} causal={causal} d={d} L={n}: {row['status']} {rate}",
                  flush=True)
  add_ratios(rows)
  benchlib.write_outputs(rows, FIELDS, args.out, plot,
                         f'attention TFLOP/s, {args.dtype}, {args.tokens} tokens per batch, '
                         f'width {args.width}, {backend} ({device_kind})', markdown_table(rows))
  return rows


if __name__ == '__main__':
  main()
