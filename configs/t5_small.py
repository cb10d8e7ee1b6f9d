"""T5 v1.1 small (Raffel et al. 2020) pre-trained with span corruption.

    python -m jaxformer.train --config=configs/t5_small.py --workdir=runs/t5_small
    python -m jaxformer.train --config=configs/t5_small.py:size=tiny --workdir=runs/t5_tiny

Presets: tiny (CPU, seconds; tests), small (8 layers each side, d=512, 6 heads of 64, gated GELU
FFN 1024, bucketed relative bias: one GPU / TPU host). Byte-level python_stdlib data with 100
sentinel ids at the top of the vocabulary, noise density 0.15, mean span 3. Adafactor with
inverse square root decay as in the paper. Expected result: not yet measured at small size.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d=32, layers=2, heads=2, hd=16, ffn=64, seq=64, batch=8, steps=2),
         'small': dict(d=512, layers=8, heads=6, hd=64, ffn=1024, seq=512, batch=128,
                       steps=100_000)}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'small'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('t5_v1_1', vocab_size=360, d_model=s['d'], num_layers=s['layers'],
                      max_length=s['seq'], attention=dict(num_heads=s['heads'], head_dim=s['hd']),
                      ffn=dict(hidden_dim=s['ffn']))
  data = dict(name='python_stdlib', task='span_corruption', tokenizer='byte', extra_ids=100,
              seq_len=s['seq'])
  optim = dict(optimizer='adafactor', lr=1e-2, schedule='inverse_sqrt',
               warmup_steps=min(10_000, max(1, s['steps'] // 10)), total_steps=s['steps'])
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10))
  return default_config(model=model, data=data, optim=optim, train=train)
