"""Families that must *learn* (CATALOG E1, E7, C7): the original Transformer and the RNN
encoder-decoder with attention reach > 99% token accuracy on held-out copy / reverse examples,
and a decoder with no position encoding (NoPE) still trains. These run real training for a few
minutes each, so they are marked slow: `python -m pytest -m slow tests/models/test_learning.py`.
"""

import os

import pytest

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config, load_config
from jaxformer.train.trainer import Trainer

pytestmark = pytest.mark.slow


CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def run_config(tmp_path, name, arg):
  """Trains a shipped config's preset as it is (the config docstrings quote these runs)."""
  config = load_config(os.path.join(CONFIGS, f'{name}.py'), arg)
  config.train.update(progress=False, async_checkpoint=False)
  return Trainer(config, str(tmp_path)).run()


@pytest.mark.parametrize('task', ['copy', 'reverse'])
def test_original_transformer_learns_copy_and_reverse(tmp_path, task):
  result = run_config(tmp_path, 'transformer_seq2seq', f'size=small,task={task}')
  assert result['eval']['accuracy'] > 0.99, result['eval']
  assert result['test']['accuracy'] > 0.99, result['test']


@pytest.mark.parametrize('task, attention', [('copy', 'bahdanau'), ('reverse', 'luong_general')])
def test_rnn_with_attention_learns_copy_and_reverse(tmp_path, task, attention):
  result = run_config(tmp_path, 'rnn_attention', f'size=small,task={task},attention={attention}')
  assert result['eval']['accuracy'] > 0.99, result['eval']
  assert result['test']['accuracy'] > 0.99, result['test']


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
