"""Minimal reproducers of the three XLA:CPU costs behind issue 15's gap to PyTorch.

    python experiments/xla_cpu_repro.py            # about 30 s on the 2-core reference CPU

Each case times forward + backward of one small program two ways, alternating. The shapes are the quickstart's (batch 8 x 256 tokens, d 128,
FFN 384, 4 / 2 heads of 32).

1. `weight_grad`: y = x W with x [2048, 128], W [128, 384]. JAX's transpose rule writes dW as
   (dy^T x)^T; XLA:CPU's dot wants its left operand's contracted axis minor, so it transposes
   dy [2048, 384] first. `jaxformer.layers.linear.dense` writes dW = x^T dy instead: XLA
   transposes the smaller x.
2. `attention`: causal GQA softmax attention; JAX's own backward of the two einsums contracts
   the [B, K, G T, S] score gradient over its middle axis, and XLA:CPU transposes all of it
   (twice). `jaxformer.attention.core` contracts the small operands instead (dK^T = Q^T dS).
3. `page_faults`: not XLA's code but its allocation pattern: one temporaries block per run,
   mapped afresh by glibc each time; run this script with JAXFORMER_CPU_ALLOCATOR=system and
   without it to compare (jaxformer/cpu_allocator.py). Reported: minor page faults per run of
   case 2's JAX-default program.

Writes experiments/results/xla_cpu_repro.csv.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jaxformer  # noqa: F401  (the CPU allocator and miscompile guard, before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.layers.linear import dense

import benchlib  # experiments/benchlib.py

FIELDS = ('case', 'variant', 'ms_median', 'ms_min', 'ms_max', 'speedup_vs_jax_default',
          'page_faults_per_run', 'allocator')


def _programs():
  r = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(r.normal(size=s) * 0.1, jnp.float32)  # noqa: E731
  x, w, dy = f32(8, 256, 128), f32(128, 384), f32(8, 256, 384)
  q, k, v, do = f32(8, 256, 4, 32), f32(8, 256, 2, 32), f32(8, 256, 2, 32), f32(8, 256, 4, 32)
  mask = AttentionMask(causal=True)

  def reference_attention(q, k, v):
    """The same math in plain einsums, differentiated by JAX."""
    b, t, n, h = q.shape
    qg = q.reshape(b, t, 2, n // 2, h)
    z = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k) * h ** -0.5
    z = jnp.where(jnp.tril(jnp.ones((t, t), bool)), z, -1e30)
    p = jax.nn.softmax(z, axis=-1)
    return jnp.einsum('BKGTS,BSKH->BTKGH', p, v).reshape(b, t, n, h)

  vjp = lambda f, *a, ct: jax.jit(lambda *a: jax.vjp(f, *a)[1](ct))  # noqa: E731
  return {
      'weight_grad': ((x, w), {
          'jax_default': vjp(lambda x, w: jnp.einsum('BTD,DF->BTF', x, w), x, w, ct=dy),
          'jaxformer': vjp(dense, x, w, ct=dy)}),
      'attention': ((q, k, v), {
          'jax_default': vjp(reference_attention, q, k, v, ct=do),
          'jaxformer': vjp(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v,
                           ct=do)}),
  }


def _faults_per_run(fn, args, runs=5) -> float:
  jax.block_until_ready(fn(*args))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(runs):
    jax.block_until_ready(fn(*args))
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / runs


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--calls', type=int, default=10)
  p.add_argument('--out', default='experiments/results/xla_cpu_repro.csv')
  args = p.parse_args(argv)
  allocator = os.environ.get('JAXFORMER_CPU_ALLOCATOR', 'reuse')
  rows = []
  for case, (inputs, variants) in _programs().items():
    times = {name: [] for name in variants}
    for fn in variants.values():
      jax.block_until_ready(fn(*inputs))
    for _ in range(args.rounds):  # alternating, so drift hits both variants alike
      for name, fn in variants.items():
        t0 = time.perf_counter()
        for _ in range(args.calls):
          jax.block_until_ready(fn(*inputs))
        times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    base = statistics.median(times['jax_default'])
    for name, fn in variants.items():
      ms = times[name]
      rows.append(dict(case=case, variant=name, ms_median=round(statistics.median(ms), 3),
                       ms_min=round(min(ms), 3), ms_max=round(max(ms), 3),
                       speedup_vs_jax_default=round(base / statistics.median(ms), 2),
                       page_faults_per_run=(round(_faults_per_run(fn, inputs))
                                            if case == 'attention' else ''),
                       allocator=allocator))
  benchlib.write_csv(rows, FIELDS, args.out)
  print('| case | variant | ms median (min-max) | speed-up | page faults/run |')
  print('|---|---|---:|---:|---:|')
  for r in rows:
    print(f"| {r['case']} | {r['variant']} | {r['ms_median']} ({r['ms_min']}-{r['ms_max']}) | "
          f"{r['speedup_vs_jax_default']} | {r['page_faults_per_run']} |")
  print(f'wrote {args.out} (allocator: {allocator}; {jax.devices()[0].device_kind})')


if __name__ == '__main__':
  main()
