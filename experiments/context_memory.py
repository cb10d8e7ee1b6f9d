"""Per-device memory of context parallelism at long context, read from compiled programs (A9).

    python experiments/context_memory.py                  # L = 32768, ~3 min on 2 CPU cores
    python experiments/context_memory.py --seq 4096

The training step (forward + backward + AdamW) of a one-layer LLaMA-style model (d 256, 8 query /
4 kv heads of 32, SwiGLU 1024, vocabulary 256, one row of L tokens, fp32) is compiled, never run,
on the CPU (8 simulated devices for the meshes), and XLA's memory analysis gives the temporaries
per device (activations, the attention working set, gradients in flight):
  one device   impl 'xla' (the reference core: the [N, L, L] scores and probabilities)
  one device   impl 'ring' without a ring (blockwise online softmax, two chunks of L / 2)
  cp8          impl 'context_allgather' (each device gathers the full K/V)
  cp8          impl 'ring'
Each row runs in its own process (the device count is fixed when JAX starts). Prints a markdown
table; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROWS = [('one device', 'xla', 1), ('one device', 'ring', 1),
        ('cp8', 'context_allgather', 8), ('cp8', 'ring', 8)]


def measure(seq: int, impl: str, context: int) -> dict:
  import jax
  import numpy as np
  from jaxformer.models import family_dict
  from jaxformer.parallel import hlo
  from jaxformer.train.experiment import Experiment, default_config
  from jaxformer.train.program import TrainProgram
  from jaxformer.train.trainer import make_layout
  model = family_dict('llama', vocab_size=256, d_model=256, num_layers=1, max_length=seq,
                      attention=dict(num_heads=8, num_kv_heads=4, head_dim=32, impl=impl),
                      ffn=dict(hidden_dim=1024))
  cfg = default_config(model=model, data=dict(name='python_stdlib', task='lm', seq_len=seq),
                       train=dict(batch_size=1),
                       parallel=dict(preset='dp', mesh={'data': 1, 'context': context}))
  exp = Experiment.from_config(cfg)
  program = TrainProgram(exp, make_layout(exp.parallel))
  zeros = lambda dt: np.zeros((1, seq), dt)  # noqa: E731
  batch = {'inputs': zeros(np.int32), 'targets': zeros(np.int32), 'segment_ids':
           np.ones((1, seq), np.int32), 'positions': np.arange(seq, dtype=np.int32)[None],
           'loss_mask': np.ones((1, seq), np.float32)}
  compiled = program.train_step.lower(program.target(), program.abstract_batch(batch)).compile()
  mem = hlo.memory(compiled)
  return {'temp_bytes': int(mem['temp']), 'devices': jax.device_count()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--seq', type=int, default=32768)
  p.add_argument('--one', help=argparse.SUPPRESS)  # 'impl,context': measure in this process
  args = p.parse_args(argv)
  if args.one:
    impl, context = args.one.split(',')
    print(json.dumps(measure(args.seq, impl, int(context))))
    return
  from jaxformer.parallel.hlo import human
  print(f'| layout | attention impl | temporaries / device (L = {args.seq}) |')
  print('|---|---|---|')
  for name, impl, context in ROWS:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={context}')
    out = subprocess.run([sys.executable, __file__, f'--seq={args.seq}', f'--one={impl},{context}'],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      print(f'| {name} | {impl} | failed: {out.stderr.strip().splitlines()[-1]} |')
      continue
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f'| {name} | `{impl}` | {human(row["temp_bytes"])} |', flush=True)


if __name__ == '__main__':
  main()
