"""BART (Lewis et al. 2020) pre-trained as a denoising autoencoder (text infilling).

    python -m jaxformer.train --config=configs/bart.py --workdir=runs/bart
    python -m jaxformer.train --config=configs/bart.py:size=tiny --workdir=runs/bart_tiny

Presets: tiny (CPU, seconds; tests), base (6+6 layers, d=768, 12 heads: one GPU / TPU host).
Byte-level python_stdlib data; 30% of tokens masked in Poisson(3) spans, one mask token per
span. Expected result: not yet measured at base size.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d=32, layers=2, heads=2, seq=64, batch=8, steps=2),
         'base': dict(d=768, layers=6, heads=12, seq=512, batch=128, steps=100_000)}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'base'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('bart', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
                      attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=4 * s['d']),
                      pad_id=0, max_length=s['seq'], position=dict(max_length=s['seq']))
  data = dict(name='python_stdlib', task='denoise', tokenizer='byte', extra_ids=0,
              seq_len=s['seq'], bart_mask_ratio=0.3, bart_poisson_lambda=3.0)
  optim = dict(optimizer='adamw', lr=4e-4 if size == 'base' else 1e-3, b2=0.98,
               weight_decay=0.01, schedule='warmup_linear',
               warmup_steps=max(1, s['steps'] // 20), total_steps=s['steps'], grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10))
  return default_config(model=model, data=data, optim=optim, train=train)
