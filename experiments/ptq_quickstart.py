"""Post-training quantization of the quickstart model (weights; weights and activations):
held-out bits per byte and size.

    python -m jaxformer.train --config=configs/quickstart.py --workdir=runs/quickstart
    python experiments/ptq_quickstart.py --workdir=runs/quickstart --out=runs/ptq_quickstart.csv

For each scheme it runs the commands a user runs: `python -m jaxformer.compress quantize
--workdir=RUN --out=RUN_ptq/<name> ...` and `python -m jaxformer.eval --workdir=<that folder>
--split=test` (the whole test split by default), and evaluates the float run the same way.
Writes the CSV (scheme, its flags, bits_per_byte, delta_bpb = quantized - float, and the sizes
in bytes from quantization.json: the quantized model, its codes, scales + zero points and float
leftovers, the float model, their ratio) and prints it as a markdown table. The acceptance
bounds of issue 12 are |delta_bpb| < 0.02 for int8 per-channel and < 0.1 for int4 group-wise;
the script exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

SCHEMES = {  # name -> (flags, bound on |delta bits per byte| or None)
    'int8-channel': (['--bits=8', '--granularity=channel'], 0.02),
    'int4-group128': (['--bits=4', '--granularity=group', '--group_size=128'], 0.1),
    'int8-tensor': (['--bits=8', '--granularity=tensor'], None),
    'int8-channel-zp-p99.99': (['--bits=8', '--granularity=channel', '--nosymmetric',
                                '--calibration=percentile', '--percentile=99.99'], None),
    'int4-channel': (['--bits=4', '--granularity=channel'], None),
    'int4-group32-embeddings': (['--bits=4', '--granularity=group', '--group_size=32',
                                 '--embeddings'], None),
    # W8A8: the inputs of the matrices too, static int8 ranges calibrated on the training split
    'w8a8-minmax': (['--bits=8', '--granularity=channel', '--activations'], None),
    'w8a8-p99.99': (['--bits=8', '--granularity=channel', '--activations',
                     '--act_calibration=percentile', '--act_percentile=99.99'], None),
    'w8a8-zp-p99.9': (['--bits=8', '--granularity=channel', '--activations',
                       '--noact_symmetric', '--act_calibration=percentile',
                       '--act_percentile=99.9'], None),
}
FIELDS = ('scheme', 'flags', 'bits_per_byte', 'delta_bpb', 'bound', 'quantized_model_bytes',
          'code_bytes', 'scale_bytes', 'float_leftover_bytes', 'float_model_bytes', 'ratio')


def run_json(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'python -m {" ".join(args)} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout[out.stdout.index('{'):])


def evaluate(workdir: str, split: str, batches: int) -> float:
  metrics = run_json(['jaxformer.eval', f'--workdir={workdir}', f'--split={split}',
                      f'--batches={batches}'])
  return metrics['bits_per_byte']


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='A finished quickstart run.')
  p.add_argument('--out', default='runs/ptq_quickstart.csv')
  p.add_argument('--split', default='test')
  p.add_argument('--batches', type=int, default=-1, help='-1: the whole split.')
  p.add_argument('--schemes', default=','.join(SCHEMES), help=f'Subset of {list(SCHEMES)}.')
  args = p.parse_args(argv)
  base = evaluate(args.workdir, args.split, args.batches)
  rows = [{'scheme': 'float32', 'flags': '', 'bits_per_byte': base, 'delta_bpb': 0.0}]
  failed = []
  for name in args.schemes.split(','):
    flags, bound = SCHEMES[name]
    folder = os.path.join(args.workdir.rstrip('/') + '_ptq', name)
    shutil.rmtree(folder, ignore_errors=True)
    record = run_json(['jaxformer.compress', 'quantize', f'--workdir={args.workdir}',
                       f'--out={folder}', *flags])
    bpb = evaluate(folder, args.split, args.batches)
    size = record['size']
    rows[0].setdefault('float_model_bytes', size['float_model_bytes'])
    rows.append({'scheme': name, 'flags': ' '.join(flags), 'bits_per_byte': bpb,
                 'delta_bpb': bpb - base, 'bound': bound,
                 **{k: size[k] for k in FIELDS if k in size}})
    if bound is not None and not abs(bpb - base) < bound:
      failed.append(name)
    print(f'{name}: bits/byte {bpb:.4f} ({bpb - base:+.4f}), '
          f'{size["quantized_model_bytes"]} bytes', file=sys.stderr, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', newline='') as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows(rows)
  print('| scheme | bits/byte | change | bytes | of float |\n|---|---|---|---|---|')
  for r in rows:
    size = r.get('quantized_model_bytes', r.get('float_model_bytes'))
    print(f'| {r["scheme"]} | {r["bits_per_byte"]:.4f} | {r["delta_bpb"]:+.4f} | {size} | '
          f'{r.get("ratio", 1.0):.3f} |')
  if failed:
    print(f'acceptance bound missed: {failed}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
