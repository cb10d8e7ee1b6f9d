"""Quickstart: a small LLaMA-style byte-level model on the Python standard library.

    python -m jaxformer.train --config=configs/quickstart.py --workdir=runs/quickstart

Hardware: a laptop or CI CPU (2 cores), about 5 minutes. Expected result: held-out bits per
byte below 2.5 on the python_stdlib validation split (recorded in docs/results.md), a
checkpoint in runs/quickstart/checkpoints and a printed code sample.
Presets: `:size=tiny` (seconds; the test suite runs it for 2 steps).
"""

import ml_collections

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = dict(kv.split('=') for kv in arg.split(',')) if arg else {}
  size = opts.get('size', 'small')
  seq_len = 256 if size == 'small' else 32
  model = family_dict(
      'llama', vocab_size=260, max_length=seq_len,
      d_model=256 if size == 'small' else 32, num_layers=4 if size == 'small' else 2,
      attention=dict(num_heads=4 if size == 'small' else 2, num_kv_heads=2 if size == 'small' else 1),
      ffn=dict(hidden_dim=512 if size == 'small' else 64), tie_embeddings=True)
  data = dict(name='python_stdlib', task='lm', tokenizer='byte', extra_ids=0, seq_len=seq_len)
  optim = dict(optimizer='adamw', lr=3e-3, b2=0.95, weight_decay=0.1, schedule='warmup_cosine',
                 warmup_steps=20 if size == 'small' else 1, total_steps=300 if size == 'small' else 2,
                 end_lr_ratio=0.1, grad_clip_norm=1.0)
  train = dict(
      batch_size=32 if size == 'small' else 4, steps=300 if size == 'small' else 2,
      log_every=25 if size == 'small' else 1, eval_every=100 if size == 'small' else 2,
      eval_batches=16 if size == 'small' else 1, checkpoint_every=100 if size == 'small' else 2,
      test_batches=32 if size == 'small' else 1,
      sample_prompt='def ', sample_tokens=200 if size == 'small' else 8)
  return default_config(model=model, data=data, optim=optim, train=train)
