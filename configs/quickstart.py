"""Quickstart: a small LLaMA-style byte-level model on the Python standard library.

    python -m jaxformer.train --config=configs/quickstart.py --workdir=runs/quickstart

Hardware: a laptop or CI CPU (2 cores), about 7.5 minutes of training. The model is LLaMA-style
(RMSNorm, RoPE, SwiGLU, grouped-query attention with QK-norm), 4 layers, d=128, byte-level
(vocabulary 260), 256-byte context, trained for 2800 steps of 8 x 256 bytes (5.7M bytes).
Result measured on the reference machine (docs/results.md): held-out bits per byte 2.32 on the
whole test split and 2.50 on the validation split (its first 16 batches); gzip -9 reaches about
1.65 on held-out files.
Presets: `:size=tiny` (seconds; the test suite runs it for 2 steps).
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import stdlib_bytes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = parse_config_arg(arg, {'size': ('small', ('tiny', 'small'))})['size'] == 'tiny'
  seq_len = 32 if tiny else 256
  steps = 2 if tiny else 2800
  model = family_dict(
      'llama', vocab_size=260, max_length=seq_len, d_model=32 if tiny else 128,
      num_layers=2 if tiny else 4,
      attention=dict(num_heads=2 if tiny else 4, num_kv_heads=1 if tiny else 2, qk_norm=True),
      scan_unroll=4,  # the whole scan unrolled: 1.2x faster steps on CPU (docs/benchmarks.md)
      ffn=dict(hidden_dim=64 if tiny else 384), tie_embeddings=True)
  data = stdlib_bytes('lm', seq_len=seq_len)
  optim = dict(optimizer='adamw', lr=3e-3, b2=0.99, weight_decay=0.1, schedule='warmup_cosine',
               warmup_steps=1 if tiny else 60, end_lr_ratio=0.1,
               grad_clip_norm=1.0)
  train = dict(
      batch_size=4 if tiny else 8, steps=steps, log_every=1 if tiny else 100,
      eval_every=2 if tiny else 700, eval_batches=1 if tiny else 16,
      checkpoint_every=2 if tiny else 700, test_batches=1 if tiny else -1,
      sample_prompt='def ', sample_tokens=8 if tiny else 200, sample_temperature=0.8,
      sample_top_k=40)
  return default_config(model=model, data=data, optim=optim, train=train)
