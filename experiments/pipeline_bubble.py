"""The pipeline bubble, counted from executed schedules (issue 11, CATALOG J).

    python experiments/pipeline_bubble.py              # S in 2,4,8; M in 1,4,8,16; R in 1,2
    python experiments/pipeline_bubble.py --stages 2,4 --microbatches 4 --out runs/bubble.csv

For every S (stages), M (micro-batches) and R (repeats: 1 is GPipe, 2 the circular schedule) the
pipeline of jaxformer/parallel/pipeline.py runs a stack of 2 R S tanh layers (width 8) on M
micro-batches; its outputs are checked against the layers applied one after the other, and its
trace (the task id each stage worked on at each iteration, carried through the pipeline with
the activations) gives the executed schedule. The bubble is the fraction of stage-iterations of
that trace with no task; the script checks it equals (S - 1) / (R M + S - 1). Circular schedules
with M < S are refused by the config (a micro-batch would come back to stage 0 before stage 0
could take it): those rows say so.

Writes the CSV (stages, microbatches, repeats, status, iterations, busy, idle, bubble, formula)
to --out and a picture next to it (.png): the executed schedule (stage x iteration, each cell
coloured by micro-batch and labelled with it, repeats hatched) of S = 4, M = 8 for GPipe and
circular, and the bubble against M.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.parallel import pipeline as pl

import benchlib  # experiments/benchlib.py, next to this script

FIELDS = ('stages', 'microbatches', 'repeats', 'status', 'iterations', 'busy', 'idle', 'bubble',
          'formula')


def _layers(w, x):
  for g in range(w.shape[0]):
    x = jnp.tanh(x @ w[g])
  return x


def execute(spec: pl.PipelineSpec, seed: int = 0) -> np.ndarray:
  """Runs the schedule on tanh layers; checks it against the sequential stack; -> the trace."""
  rng = np.random.default_rng(seed)
  groups = 2 * spec.stages * spec.repeats
  w = jnp.asarray(rng.normal(size=(groups, 8, 8)) * 0.5, jnp.float32)
  x = jnp.asarray(rng.normal(size=(spec.microbatches, 2, 8)), jnp.float32)
  stage_fn = lambda wc, xs, sd, m: (_layers(wc, xs), {})  # noqa: E731
  out, _, trace = jax.jit(lambda w, x: pl.run(stage_fn, pl.to_stages(w, spec), x,
                                              jnp.zeros((spec.microbatches,)), spec))(w, x)
  expected = jax.vmap(lambda xm: _layers(w, xm))(x)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  return np.asarray(trace)


def measure(stages, microbatches, repeats) -> tuple[list[dict], dict]:
  rows, traces = [], {}
  for s in stages:
    for r in repeats:
      for m in microbatches:
        row = {'stages': s, 'microbatches': m, 'repeats': r}
        try:
          spec = pl.PipelineSpec(s, m, r)
        except ValueError as e:
          rows.append(dict(row, status=f'refused: {e}'))
          continue
        trace = execute(spec)
        traces[(s, m, r)] = trace
        idle = int(np.sum(trace < 0))
        bubble = pl.idle_fraction(trace)
        formula = (s - 1) / (r * m + s - 1)
        if abs(bubble - formula) > 1e-12:
          raise AssertionError(f'S={s} M={m} R={r}: bubble {bubble} != formula {formula}')
        rows.append(dict(row, status='ok', iterations=trace.shape[0], busy=trace.size - idle,
                         idle=idle, bubble=round(bubble, 6), formula=round(formula, 6)))
  return rows, traces


def plot(rows, traces, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  shown = [k for k in ((4, 8, 1), (4, 8, 2)) if k in traces]
  fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(11, 2.2 * len(shown) + 3.2))
  axes = np.atleast_1d(axes)
  cmap = plt.get_cmap('tab10')
  for ax, key in zip(axes, shown):
    s, m, r = key
    trace = traces[key]
    for t in range(trace.shape[0]):
      for st in range(s):
        k = trace[t, st]
        if k < 0:
          ax.add_patch(Rectangle((t, st), 1, 1, facecolor='0.92', edgecolor='white'))
          continue
        ax.add_patch(Rectangle((t, st), 1, 1, facecolor=cmap((k % m) % 10),
                               edgecolor='white', hatch='//' if k // m else None))
        ax.text(t + 0.5, st + 0.5, str(k % m), ha='center', va='center', fontsize=7)
    ax.set_xlim(0, trace.shape[0])
    ax.set_ylim(s, 0)
    ax.set_yticks(np.arange(s) + 0.5, [f'stage {i}' for i in range(s)])
    ax.set_xlabel('iteration')
    name = 'GPipe' if r == 1 else f'circular, R={r} (hatched: second repeat)'
    ax.set_title(f'{name}: S={s}, M={m}; cells: micro-batch; grey: idle; bubble '
                 f'{pl.idle_fraction(trace):.3f} = (S-1)/(RM+S-1)')
  ax = axes[-1]
  ok = [row for row in rows if row['status'] == 'ok']
  for s in sorted({row['stages'] for row in ok}):
    for r in sorted({row['repeats'] for row in ok}):
      pts = sorted((row['microbatches'], row['bubble']) for row in ok
                   if row['stages'] == s and row['repeats'] == r)
      if pts:
        ax.plot(*zip(*pts), marker='o', linestyle='-' if r == 1 else '--', label=f'S={s}, R={r}')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('micro-batches M')
  ax.set_ylabel('bubble (idle fraction)')
  ax.legend(ncol=3, fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda text: [int(v) for v in text.split(',')]  # noqa: E731
  p.add_argument('--stages', type=ints, default=[2, 4, 8])
  p.add_argument('--microbatches', type=ints, default=[1, 4, 8, 16])
  p.add_argument('--repeats', type=ints, default=[1, 2])
  p.add_argument('--out', default='experiments/results/pipeline_bubble.csv')
  args = p.parse_args(argv)
  rows, traces = measure(args.stages, args.microbatches, args.repeats)
  benchlib.write_csv(rows, FIELDS, args.out)
  plot(rows, traces, args.out[:-4] + '.png')
  print('| S | M | R | iterations | idle / all stage-iterations | bubble | (S-1)/(RM+S-1) |')
  print('|---|---|---|---|---|---|---|')
  for row in rows:
    if row['status'] != 'ok':
      print(f"| {row['stages']} | {row['microbatches']} | {row['repeats']} | refused: M < S "
            'for a circular schedule | | | |')
      continue
    print(f"| {row['stages']} | {row['microbatches']} | {row['repeats']} | {row['iterations']} "
          f"| {row['idle']} / {row['idle'] + row['busy']} | {row['bubble']:.4f} | "
          f"{row['formula']:.4f} |")
  return rows


if __name__ == '__main__':
  main(sys.argv[1:])
