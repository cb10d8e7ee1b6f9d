"""The original Transformer (Vaswani et al. 2017) on a synthetic sequence-to-sequence task.

    python -m jaxformer.train --config=configs/transformer_seq2seq.py --workdir=runs/transformer
    python -m jaxformer.train --config=configs/transformer_seq2seq.py:size=tiny,task=copy --workdir=runs/t

Post-LN encoder-decoder, sinusoidal positions, ReLU FFN, sqrt(d) embedding scale, shared
embeddings; AdamW with betas (0.9, 0.98) and the paper's inverse square root schedule.
`task` is copy, reverse (default), sort or addition (offline `synthetic_seq2seq` data).
Presets: tiny (CPU, seconds; tests), small (CPU, a few minutes: d=64, 2+2 layers; reaches > 99%
held-out token accuracy on copy and reverse, checked by tests/models/test_learning.py), base (the
paper's base model: 6+6 layers, d=512, 8 heads, FFN 2048; a GPU).
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d=32, layers=1, heads=2, ffn=64, batch=8, steps=2, warmup=1, lr=1e-3),
         'small': dict(d=64, layers=2, heads=4, ffn=256, batch=64, steps=1500, warmup=100,
                       lr=1e-3),
         'base': dict(d=512, layers=6, heads=8, ffn=2048, batch=256, steps=100_000,
                      warmup=4000, lr=None)}


def get_config(arg=None):
  opts = dict(kv.split('=') for kv in arg.split(',')) if arg else {}
  size, task = opts.get('size', 'small'), opts.get('task', 'reverse')
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('transformer', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
                      max_length=32, attention=dict(num_heads=s['heads']),
                      ffn=dict(hidden_dim=s['ffn']), residual_dropout=0.1 * (size == 'base'))
  data = dict(name=f'synthetic_seq2seq/{task}', task='seq2seq', tokenizer='byte', extra_ids=0,
              seq_len=24, target_len=24,
              builder_config=dict(max_length=12, num_train=20000, num_validation=512,
                                  num_test=512))
  # Noam: lr = d^-0.5 * min(step^-0.5, step * warmup^-1.5) = (d * warmup)^-0.5 at the peak.
  lr = s['lr'] or (s['d'] * s['warmup']) ** -0.5
  optim = dict(optimizer='adamw', lr=lr, b2=0.98, eps=1e-9,
               schedule='inverse_sqrt' if size == 'base' else 'warmup_cosine',
               warmup_steps=s['warmup'], total_steps=s['steps'], end_lr_ratio=0.05,
               grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 30),
               eval_every=max(2, s['steps'] // 3), checkpoint_every=max(2, s['steps'] // 3),
               eval_batches=8, test_batches=8)
  return default_config(model=model, data=data, optim=optim, train=train)
