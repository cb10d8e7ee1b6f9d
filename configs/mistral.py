"""Mistral-style decoder (Jiang et al. 2023): LLaMA blocks with sliding-window attention.

    python -m jaxformer.train --config=configs/mistral.py:size=small --workdir=runs/mistral_small
    python -m jaxformer.train --config=configs/mistral.py:size=tiny --workdir=runs/mistral_tiny

Presets: tiny (CPU, seconds; tests), small (CPU or one GPU), and the paper's size (TPU pod /
GPU cluster with FSDP and tensor rules in `parallel`). Byte-level python_stdlib data.
Expected results: not yet measured beyond the tiny preset.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=64, seq=64, window=16, batch=8, steps=2),
    'small': dict(d=256, layers=4, heads=4, kv=2, ffn=512, seq=512, window=128, batch=16, steps=1000),
    '7b': dict(d=4096, layers=32, heads=32, kv=8, ffn=14336, seq=8192, window=4096, batch=256, steps=100_000),
}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'small'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  big = size not in ('tiny', 'small')
  model = family_dict('mistral', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
                      max_length=s['seq'], attention=dict(num_heads=s['heads'], num_kv_heads=s['kv'], window=s['window']),
                      ffn=dict(hidden_dim=s['ffn']), remat='dots_no_batch' if big else 'none',
                      dtype='bfloat16' if big else 'float32')
  data = dict(name='python_stdlib', task='lm', tokenizer='byte', extra_ids=0, seq_len=s['seq'])
  optim = dict(optimizer='adamw', lr=3e-4 if big else 1e-3, b2=0.95, weight_decay=0.1,
               schedule='warmup_cosine', warmup_steps=max(1, s['steps'] // 50),
               total_steps=s['steps'], end_lr_ratio=0.1, grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10))
  if big:
    parallel = dict(mesh={'data': -1, 'fsdp': 8, 'tensor': 1})
    return default_config(model=model, data=data, optim=optim, train=train, parallel=parallel)
  return default_config(model=model, data=data, optim=optim, train=train)
