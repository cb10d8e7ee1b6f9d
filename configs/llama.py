"""LLaMA-style decoder (Touvron et al. 2023): RMSNorm, RoPE, SwiGLU, grouped-query attention.

    python -m jaxformer.train --config=configs/llama.py:size=125m --workdir=runs/llama_125m
    python -m jaxformer.train --config=configs/llama.py:size=tiny --workdir=runs/llama_tiny

Presets: tiny (CPU, seconds; tests), small (CPU, minutes: the quickstart's model), 125m (one GPU,
d=768, 12 layers, 12 heads / 4 KV heads), 1b (a GPU/TPU host or more: d=2048, 16 layers, 32 heads
/ 8 KV heads, 2048 context). Byte-level python_stdlib data. Expected results: `small` reaches the
quickstart figure in docs/results.md; 125m and 1b not yet measured.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=64, seq=64, batch=8, steps=2, lr=3e-3),
    'small': dict(d=256, layers=4, heads=4, kv=2, ffn=512, seq=256, batch=16, steps=1000,
                  lr=1e-3),
    '125m': dict(d=768, layers=12, heads=12, kv=4, ffn=2048, seq=1024, batch=128, steps=20_000,
                 lr=6e-4),
    '1b': dict(d=2048, layers=16, heads=32, kv=8, ffn=5632, seq=2048, batch=256, steps=50_000,
               lr=3e-4),
}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'small'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('llama', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
                      max_length=s['seq'], attention=dict(num_heads=s['heads'],
                                                          num_kv_heads=s['kv']),
                      ffn=dict(hidden_dim=s['ffn']),
                      remat='none' if size in ('tiny', 'small') else 'dots_no_batch',
                      dtype='float32' if size in ('tiny', 'small') else 'bfloat16')
  data = dict(name='python_stdlib', task='lm', tokenizer='byte', extra_ids=0, seq_len=s['seq'])
  optim = dict(optimizer='adamw', lr=s['lr'], b2=0.95, weight_decay=0.1,
               schedule='warmup_cosine', warmup_steps=max(1, s['steps'] // 50),
               total_steps=s['steps'], end_lr_ratio=0.1, grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10),
               sample_prompt='def ', sample_tokens=0 if size == 'tiny' else 200)
  return default_config(model=model, data=data, optim=optim, train=train)
