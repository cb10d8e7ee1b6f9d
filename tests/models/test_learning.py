"""Families that must *learn* (CATALOG E1, E7, C7): the original Transformer and the RNN
encoder-decoder with attention reach > 99% token accuracy on held-out copy / reverse examples,
and a decoder with no position encoding (NoPE) still trains. These run real training for a few
minutes each, so they are marked slow: `python -m pytest -m slow tests/models/test_learning.py`.
"""

import pytest

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.trainer import Trainer

pytestmark = pytest.mark.slow


def seq2seq_config(model, task, steps, lr):
  data = dict(name=f'synthetic_seq2seq/{task}', task='seq2seq', tokenizer='byte', extra_ids=0,
              seq_len=24, target_len=24,
              builder_config=dict(max_length=12, num_train=20000, num_validation=512,
                                  num_test=512))
  optim = dict(optimizer='adamw', lr=lr, b2=0.98, schedule='warmup_cosine', warmup_steps=100,
               total_steps=steps, end_lr_ratio=0.05, grad_clip_norm=1.0)
  train = dict(batch_size=64, steps=steps, log_every=100, eval_every=steps, eval_batches=8,
               checkpoint_every=steps, progress=False, async_checkpoint=False)
  return default_config(model=model, data=data, optim=optim, train=train)


@pytest.mark.parametrize('task', ['copy', 'reverse'])
def test_original_transformer_learns_copy_and_reverse(tmp_path, task):
  model = family_dict('transformer', vocab_size=260, d_model=64, num_layers=2, max_length=32,
                      attention=dict(num_heads=4), ffn=dict(hidden_dim=256))
  result = Trainer(seq2seq_config(model, task, steps=1500, lr=1e-3), str(tmp_path)).run()
  assert result['eval']['accuracy'] > 0.99, result['eval']


@pytest.mark.parametrize('task, attention', [('copy', 'bahdanau'), ('reverse', 'luong_general')])
def test_rnn_with_attention_learns_copy_and_reverse(tmp_path, task, attention):
  model = family_dict('rnn', vocab_size=260, d_model=64, max_length=32,
                      rnn=dict(cell='gru', attention=attention, hidden_dim=64))
  result = Trainer(seq2seq_config(model, task, steps=1500, lr=3e-3), str(tmp_path)).run()
  assert result['eval']['accuracy'] > 0.99, result['eval']


def test_nope_decoder_still_trains(tmp_path):
  model = family_dict('llama', vocab_size=260, d_model=64, num_layers=2, max_length=64,
                      attention=dict(num_heads=4), position=dict(kind='none'))
  data = dict(name='python_stdlib/small', task='lm', tokenizer='byte', extra_ids=0, seq_len=64)
  optim = dict(optimizer='adamw', lr=3e-3, schedule='warmup_cosine', warmup_steps=20,
               total_steps=300)
  train = dict(batch_size=32, steps=300, log_every=50, eval_every=300, eval_batches=8,
               checkpoint_every=300, progress=False, async_checkpoint=False)
  result = Trainer(default_config(model=model, data=data, optim=optim, train=train),
                   str(tmp_path)).run()
  # A byte-level unigram model of Python source costs about 4.5 bits per byte; learning
  # context without any position signal must get well below it.
  assert result['eval']['bits_per_byte'] < 3.5, result['eval']
