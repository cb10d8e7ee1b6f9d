"""GPT-2 small (124M parameter body, Radford et al. 2019) as a byte-level code model.

    python -m jaxformer.train --config=configs/gpt2_small.py --workdir=runs/gpt2_small
    python -m jaxformer.train --config=configs/gpt2_small.py:size=tiny --workdir=runs/gpt2_tiny

Hardware: `small` is meant for one GPU/TPU host (12 layers, d=768, 12 heads, 1024 context,
learned positions, tanh GELU, tied head; byte-level vocabulary instead of GPT-2's 50257 BPE so it
trains on the offline python_stdlib corpus). `tiny` runs on a CPU in seconds (used by the tests).
Expected result: not yet measured at full size.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d_model=32, num_layers=2, num_heads=2, seq_len=64, batch=8, steps=2),
         'small': dict(d_model=768, num_layers=12, num_heads=12, seq_len=1024, batch=64,
                       steps=20_000)}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'small'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('gpt2', vocab_size=260, d_model=s['d_model'], num_layers=s['num_layers'],
                      max_length=s['seq_len'], attention=dict(num_heads=s['num_heads']),
                      position=dict(max_length=s['seq_len']), embed_dropout=0.1 * (size != 'tiny'),
                      residual_dropout=0.1 * (size != 'tiny'))
  data = dict(name='python_stdlib', task='lm', tokenizer='byte', extra_ids=0, seq_len=s['seq_len'])
  optim = dict(optimizer='adamw', lr=6e-4, b2=0.95, weight_decay=0.1, schedule='warmup_cosine',
               warmup_steps=max(1, s['steps'] // 20), total_steps=s['steps'], end_lr_ratio=0.1,
               grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10))
  return default_config(model=model, data=data, optim=optim, train=train)
