"""BERT-base masked language model (Devlin et al. 2019): post-LN encoder, learned positions, token types, MLM head with 80/10/10 dynamic masking.

    python -m jaxformer.train --config=configs/bert_base_mlm.py --workdir=runs/bert_base_mlm
    python -m jaxformer.train --config=configs/bert_base_mlm.py:size=tiny --workdir=runs/bert_base_mlm_tiny

Presets: tiny (CPU, seconds; tests), base (12 layers, d=768, 12 heads, 512 positions: one GPU /
TPU host). Byte-level python_stdlib data with masking probability 0.15. Expected result: not yet
measured at base size.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d=32, layers=2, heads=2, seq=64, batch=8, steps=2),
         'base': dict(d=768, layers=12, heads=12, seq=512, batch=256, steps=100_000)}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'base'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('bert', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
                      attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=4 * s['d']),
                      pad_id=0, embed_dropout=0.0 if size == 'tiny' else 0.1,
                      residual_dropout=0.0 if size == 'tiny' else 0.1)
  data = dict(name='python_stdlib', task='mlm', tokenizer='byte', extra_ids=0, seq_len=s['seq'],
              mlm_probability=0.15)
  optim = dict(optimizer='adamw', lr=1e-4 if size == 'base' else 1e-3, b2=0.98 if 'bert' == 'roberta' else 0.999,
               weight_decay=0.01, schedule='warmup_linear',
               warmup_steps=max(1, s['steps'] // 100), total_steps=s['steps'], grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 200),
               eval_every=max(2, s['steps'] // 10), checkpoint_every=max(2, s['steps'] // 10))
  return default_config(model=model, data=data, optim=optim, train=train)
