"""LLaMA-style decoder (Touvron et al. 2023): RMSNorm, RoPE, SwiGLU, grouped-query attention.

    python -m jaxformer.train --config=configs/llama.py:size=125m --workdir=runs/llama_125m
    python -m jaxformer.train --config=configs/llama.py:size=tiny --workdir=runs/llama_tiny

Presets (`:size=`), all byte-level (260 ids) on the offline python_stdlib corpus:
  tiny   d=32, 2 layers, 2 heads / 1 KV head; a CPU in seconds (tests/test_configs.py).
  small  d=256, 4 layers, 4 / 2 heads, FFN 704, 256 context, 2000 steps of 16 x 256 bytes; a
         CPU in about half an hour (not timed) or a GPU in minutes.
  125m   d=768, 12 layers, 12 / 4 heads, FFN 2048, 1024 context; one GPU (bf16 compute, remat).
  1b     d=2048, 16 layers, 32 / 8 heads, FFN 8192, 2048 context (the Llama 3.2 1B shape with a
         byte vocabulary); a host of 8 GPUs or a TPU host, parameters and optimizer state
         sharded over all devices (FSDP).
Optimizer (the paper's): AdamW, betas (0.9, 0.95), eps 1e-5, weight decay 0.1, clip 1.0, warmup
then cosine decay to 10% of the peak. The corpus has about 10.6M training bytes, so 125m (64 x
1024 bytes, 2000 steps) and 1b (64 x 2048, 1000 steps) make about 12 passes and will overfit:
they run the paper-size architecture; real pre-training needs a larger prepared corpus
(`--config.data.name=...`).
Expected results: not yet measured (the quickstart, a smaller LLaMA, is in docs/results.md).
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, lm_sample, stdlib_bytes, warmup_adamw, zero3_over_host

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=64, seq=64, batch=8, steps=2, lr=3e-3),
    'small': dict(d=256, layers=4, heads=4, kv=2, ffn=704, seq=256, batch=16, steps=2000,
                  lr=1e-3),
    '125m': dict(d=768, layers=12, heads=12, kv=4, ffn=2048, seq=1024, batch=64, steps=2000,
                 lr=6e-4),
    '1b': dict(d=2048, layers=16, heads=32, kv=8, ffn=8192, seq=2048, batch=64, steps=1000,
               lr=3e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  size, s = opts['size'], SIZES[opts['size']]
  big = size in ('125m', '1b')
  model = family_dict(
      'llama', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], num_kv_heads=s['kv']), ffn=dict(hidden_dim=s['ffn']),
      remat='dots_no_batch' if big else 'none', dtype='bfloat16' if big else 'float32')
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.95, eps=1e-5, weight_decay=0.1,
                       end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], **lm_sample(size))
  parallel = zero3_over_host(size == '1b')
  return default_config(model=model, data=data, optim=optim, train=train, parallel=parallel)
