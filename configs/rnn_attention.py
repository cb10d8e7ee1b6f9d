"""The pre-Transformer baseline: a GRU / LSTM encoder-decoder with attention (Bahdanau et al.
2015; Luong et al. 2015) on a synthetic sequence-to-sequence task.

    python -m jaxformer.train --config=configs/rnn_attention.py --workdir=runs/rnn
    python -m jaxformer.train --config=configs/rnn_attention.py:attention=luong_general,cell=lstm,task=reverse --workdir=runs/rnn_luong

A bidirectional encoder RNN reads the source; the decoder RNN attends over its states each step,
either from its previous state before the update (Bahdanau: additive scores) or from its new
state after it (Luong: dot, general = bilinear, or concat scores). Data: the offline
`synthetic_seq2seq` set (up to 12 characters, byte-level, 20000 / 512 / 512 disjoint train /
validation / test pairs), one pair per row (`packing='none'`): the RNN carries its state along
a row and has no segment masking, so packed rows would mix pairs. Parameters start at N(0, 0.1)
(`model.init_std`), close to the papers' U(-0.1, 0.1); the Transformer default of 0.02 leaves
the encoder states and attention scores so small that Luong attention stays uniform.
Options (`:key=value,...`): `cell` gru (default) | lstm; `attention` bahdanau (default) |
luong_dot | luong_general | luong_concat; `task` copy (default) | reverse | sort | addition;
`size`:
  small  embeddings and hidden states of 64; AdamW (0.9, 0.98), lr 3e-3, warmup 100 then
         cosine, clip 1.0, 1500 steps of 64 pairs; 1-4 minutes on the 2-core reference CPU.
         Measured once each (seed 0), held-out token accuracy on validation and test: 100%
         for GRU + bahdanau on copy, GRU + luong_general on reverse, LSTM + luong_concat on
         reverse and GRU + luong_dot on sort. Other combinations: not yet measured.
  tiny   16 wide; a CPU in seconds (tests/test_configs.py).
The papers' own settings (1000-unit RNNs, Adadelta or SGD on WMT'14 English-French) are for
translation data this offline set does not have.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence

OPTIONS = {'size': ('small', 'tiny'), 'cell': ('gru', 'lstm'),
           'attention': ('bahdanau', 'luong_dot', 'luong_general', 'luong_concat'),
           'task': ('copy', 'reverse', 'sort', 'addition')}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {k: (v[0], v) for k, v in OPTIONS.items()})
  tiny = opts['size'] == 'tiny'
  width = 16 if tiny else 64
  model = family_dict('rnn', vocab_size=260, d_model=width, max_length=32, init_std=0.1,
                      rnn=dict(cell=opts['cell'], attention=opts['attention'], hidden_dim=width))
  data = dict(name=f"synthetic_seq2seq/{opts['task']}", task='seq2seq', tokenizer='byte',
              extra_ids=0, seq_len=24, target_len=24, packing='none',
              builder_config=dict(max_length=12, num_train=20000, num_validation=512,
                                  num_test=512))
  steps = 2 if tiny else 1500
  optim = dict(optimizer='adamw', lr=3e-3, b2=0.98, schedule='warmup_cosine',
               warmup_steps=1 if tiny else 100, end_lr_ratio=0.05,
               grad_clip_norm=1.0)
  train = cadence(8 if tiny else 64, steps, logs=30, evals=3, eval_batches=8, test_batches=8)
  return default_config(model=model, data=data, optim=optim, train=train)
