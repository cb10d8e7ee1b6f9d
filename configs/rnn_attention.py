"""The pre-Transformer baseline: a GRU / LSTM encoder-decoder with attention (Bahdanau et al.
2015; Luong et al. 2015) on a synthetic sequence-to-sequence task.

    python -m jaxformer.train --config=configs/rnn_attention.py --workdir=runs/rnn
    python -m jaxformer.train --config=configs/rnn_attention.py:attention=luong_general,cell=lstm --workdir=runs/rnn_luong

Options: `cell` gru | lstm, `attention` bahdanau | luong_dot | luong_general | luong_concat,
`task` copy | reverse | sort | addition, `size` tiny (CPU seconds; tests) | small (CPU minutes:
> 99% held-out token accuracy on copy, see tests/models/test_learning.py).
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config


def get_config(arg=None):
  opts = dict(kv.split('=') for kv in arg.split(',')) if arg else {}
  size = opts.get('size', 'small')
  if size not in ('tiny', 'small'):
    raise ValueError(f"size={size!r} is invalid: allowed values are ['tiny', 'small']")
  tiny = size == 'tiny'
  model = family_dict('rnn', vocab_size=260, d_model=16 if tiny else 64, max_length=32,
                      rnn=dict(cell=opts.get('cell', 'gru'),
                               attention=opts.get('attention', 'bahdanau'),
                               hidden_dim=16 if tiny else 64))
  data = dict(name=f"synthetic_seq2seq/{opts.get('task', 'copy')}", task='seq2seq',
              tokenizer='byte', extra_ids=0, seq_len=24, target_len=24,
              builder_config=dict(max_length=12, num_train=20000, num_validation=512,
                                  num_test=512))
  steps = 2 if tiny else 1500
  optim = dict(optimizer='adamw', lr=3e-3, b2=0.98, schedule='warmup_cosine',
               warmup_steps=1 if tiny else 100, total_steps=steps, end_lr_ratio=0.05,
               grad_clip_norm=1.0)
  train = dict(batch_size=8 if tiny else 64, steps=steps, log_every=max(1, steps // 30),
               eval_every=max(2, steps // 3), checkpoint_every=max(2, steps // 3),
               eval_batches=8, test_batches=8)
  return default_config(model=model, data=data, optim=optim, train=train)
