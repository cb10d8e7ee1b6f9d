"""Mistral-style decoder (Jiang et al. 2023): LLaMA blocks with sliding-window attention.

    python -m jaxformer.train --config=configs/mistral.py:size=small --workdir=runs/mistral_small
    python -m jaxformer.train --config=configs/mistral.py:size=tiny --workdir=runs/mistral_tiny

Each query attends to the previous `window` keys only (the paper's W), so attention cost grows
as T * W rather than T^2 and information still travels L * W tokens back through the layers.
Presets (`:size=`), all byte-level (260 ids) on the offline python_stdlib corpus:
  tiny   d=32, 2 layers, window 16 over 64 tokens; a CPU in seconds (tests/test_configs.py).
  small  d=256, 4 layers, 4 / 2 heads, window 128 over 512 tokens, 2000 steps of 16 rows; one
         GPU (on a CPU, an hour or more; not timed).
  7b     the paper's shape: d=4096, 32 layers, 32 / 8 heads of 128, FFN 14336, window 4096,
         8192 context, RoPE theta 10^4 (Mistral 7B v0.1); a host of 8 GPUs or a TPU pod slice,
         bf16 compute, remat, parameters and optimizer state sharded over all devices (FSDP).
Optimizer: the paper publishes none; LLaMA's AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1,
clip 1.0, warmup then cosine to 10%. 7b (32 x 8192 bytes, 500 steps) makes about 12 passes over
the 10.6M training bytes: it runs the architecture at scale, it is not a pre-training recipe.
Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, lm_sample, stdlib_bytes, warmup_adamw, zero3_over_host

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=64, seq=64, window=16, batch=8, steps=2,
                 lr=3e-3),
    'small': dict(d=256, layers=4, heads=4, kv=2, ffn=704, seq=512, window=128, batch=16,
                  steps=2000, lr=1e-3),
    '7b': dict(d=4096, layers=32, heads=32, kv=8, ffn=14336, seq=8192, window=4096, batch=32,
               steps=500, lr=3e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  size, s = opts['size'], SIZES[opts['size']]
  big = size == '7b'
  model = family_dict(
      'mistral', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], num_kv_heads=s['kv'], window=s['window']),
      position=dict(rope_theta=1e4), ffn=dict(hidden_dim=s['ffn']),
      remat='dots_no_batch' if big else 'none', dtype='bfloat16' if big else 'float32')
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.95, eps=1e-5, weight_decay=0.1,
                       end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], **lm_sample(size))
  parallel = zero3_over_host(big)
  return default_config(model=model, data=data, optim=optim, train=train, parallel=parallel)
