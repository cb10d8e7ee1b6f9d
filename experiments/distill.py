"""Knowledge distillation on python_stdlib bytes: a distilled student against the same student
trained alone (CATALOG H; Hinton et al. 2015).

    python experiments/distill.py                      # ~4 CPU-minutes on a 2-core CPU
    python experiments/distill.py --quick              # the slow test's shorter students

1. A teacher (LLaMA-style, d=96, 3 layers, 4 heads) is trained on the byte-level
   python_stdlib LM task for --teacher-steps steps.
2. A student (d=32, 1 layer, 2 heads) is trained for --student-steps steps twice, with the same
   seed, data order and optimizer: alone (cross entropy), and distilled from the teacher
   (compress.distill: loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE), once
   for each of --temperatures.
3. Each model's held-out loss and bits per byte are measured on the same --eval-batches batches
   of the validation split.

Writes a CSV (model, steps, params, eval_loss, eval_bits_per_byte, cpu_seconds) to --out and a
plot of the students' validation loss during training (.png next to it). The run folders go
under --workdir (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxformer.models import family_dict  # noqa: E402
from jaxformer.train.experiment import default_config  # noqa: E402
from jaxformer.train.recipes import stdlib_bytes  # noqa: E402

FIELDS = ('model', 'steps', 'params', 'eval_loss', 'eval_bits_per_byte', 'cpu_seconds')
SEQ_LEN = 64


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--teacher-steps', type=int, default=1200)
  p.add_argument('--student-steps', type=int, default=600)
  p.add_argument('--temperatures', default='1,2',
                 help='a distilled student for each temperature T')
  p.add_argument('--alpha', type=float, default=0.5)
  p.add_argument('--eval-batches', type=int, default=64)
  p.add_argument('--quick', action='store_true',
                 help='students 300 steps (the teacher keeps its 1200: a weaker one does not help)')
  p.add_argument('--workdir', default=None)
  p.add_argument('--out', default='experiments/results/distill.csv')
  args = p.parse_args(argv)
  if args.quick:
    args.student_steps = 300
  return args


def config(size: str, steps: int, eval_batches: int, distill=None):
  """The teacher ('teacher') or student ('student') experiment."""
  d, layers, heads, ffn = (96, 3, 4, 256) if size == 'teacher' else (32, 1, 2, 64)
  model = family_dict('llama', vocab_size=260, max_length=SEQ_LEN, d_model=d, num_layers=layers,
                      attention=dict(num_heads=heads), ffn=dict(hidden_dim=ffn),
                      tie_embeddings=True)
  optim = dict(optimizer='adamw', lr=3e-3, b2=0.99, weight_decay=0.1, schedule='warmup_cosine',
               warmup_steps=max(1, steps // 20), end_lr_ratio=0.1, grad_clip_norm=1.0)
  train = dict(batch_size=16, steps=steps, log_every=max(1, steps // 10),
               eval_every=max(2, steps // 10), eval_batches=eval_batches,
               checkpoint_every=steps, test_batches=0, progress=False, tensorboard=False,
               async_checkpoint=False, compilation_cache='none')
  return default_config(model=model, data=stdlib_bytes('lm', seq_len=SEQ_LEN), optim=optim,
                        train=train, compress={'distill': distill or {}})


def train(cfg, workdir: str, eval_batches: int) -> dict:
  from jaxformer.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  t0 = time.process_time()
  trainer = Trainer(cfg, workdir)
  params = trainer.num_params
  trainer.run()
  seconds = time.process_time() - t0
  again = Trainer(cfg, workdir, mode='eval')
  ev = again.evaluate(again.exp.data.eval_split, eval_batches)
  again.close()
  return {'steps': cfg.train.steps, 'params': params, 'eval_loss': ev['loss'],
          'eval_bits_per_byte': ev['bits_per_byte'], 'cpu_seconds': seconds}


def temperatures(args) -> list[float]:
  return [float(t) for t in args.temperatures.split(',')]


def curve(workdir: str) -> tuple[list[int], list[float]]:
  steps, losses = [], []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      m = json.loads(line)
      if 'eval/loss' in m:
        steps.append(m['step'])
        losses.append(m['eval/loss'])
  return steps, losses


def run(args) -> list[dict]:
  root = args.workdir or tempfile.mkdtemp(prefix='distill_')
  dirs = {k: os.path.join(root, k) for k in ('teacher', 'student_alone')}
  rows = [dict(model='teacher', **train(config('teacher', args.teacher_steps, args.eval_batches),
                                        dirs['teacher'], args.eval_batches))]
  rows.append(dict(model='student_alone', **train(
      config('student', args.student_steps, args.eval_batches), dirs['student_alone'],
      args.eval_batches)))
  for t in temperatures(args):
    name = f'student_distilled_T{t:g}'
    dirs[name] = os.path.join(root, name)
    distill = {'teacher': dirs['teacher'], 'temperature': t, 'alpha': args.alpha}
    rows.append(dict(model=name, **train(
        config('student', args.student_steps, args.eval_batches, distill), dirs[name],
        args.eval_batches)))
  for r in rows:
    print(', '.join(f'{k}={r[k]:.4g}' if isinstance(r[k], float) else f'{k}={r[k]}'
                    for k in FIELDS), flush=True)
  if args.out:
    write(rows, args, dirs)
  return rows


def write(rows, args, dirs) -> None:
  import csv  # pylint: disable=import-outside-toplevel

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows({k: r[k] for k in FIELDS} for r in rows)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in ['student_alone'] + [f'student_distilled_T{t:g}' for t in temperatures(args)]:
    ax.plot(*curve(dirs[name]), marker='o', label=name)
  teacher = next(r for r in rows if r['model'] == 'teacher')
  ax.axhline(teacher['eval_loss'], color='gray', ls='--', label='teacher (final)')
  ax.set_xlabel('step')
  ax.set_ylabel('validation loss (nats / byte)')
  ax.set_title(f'distillation of a byte LM, alpha={args.alpha}')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.splitext(args.out)[0] + '.png', dpi=100)
  print(f'wrote {args.out} and its .png', flush=True)


if __name__ == '__main__':
  run(parse_args())
