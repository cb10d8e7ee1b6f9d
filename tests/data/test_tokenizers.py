"""Tokenizers: layout, exact round trips, SentencePiece training."""

import numpy as np
import pytest

from jaxformer.data import listops
from jaxformer.data import tokenizers

TEXT = 'def f(x):\n\treturn x  # héllo ✓ 😀\n\n'


def test_byte_layout_and_round_trip():
  tok = tokenizers.ByteTokenizer(extra_ids=10)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 270 and tok.regular_ids == range(4, 260)
  assert tok.sentinel(0) == 269 and tok.sentinel(9) == 260
  with pytest.raises(ValueError, match='extra_ids=10'):
    tok.sentinel(10)
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and ids.min() >= 4 and ids.max() < 260
  assert tok.decode(ids) == TEXT
  every_byte = bytes(range(256))
  assert tok.decode_bytes(tok.encode(every_byte)) == every_byte
  np.testing.assert_array_equal(tok.encode(b'A'), [ord('A') + 4])
  assert tok.decode([1, *tok.encode('ab'), 3, tok.sentinel(2), 2, 0]) == 'ab<mask><extra_id_2>'


def test_vocab_tokenizer_for_listops():
  tok = tokenizers.VocabTokenizer(listops.TOKENS)
  text = '[MAX 2 9 [MIN 4 7 ] 0 ]'
  ids = tok.encode(text)
  assert ids.min() >= 5 and ids.max() < tok.vocab_size == 5 + 15
  assert tok.decode(ids) == text
  assert tok.encode('[FOO 1')[0] == tok.UNK


def test_sentencepiece_trains_deterministically_and_round_trips():
  corpus = [TEXT * 3, 'import os\nimport sys\n\nclass A:\n  pass\n' * 20,
            ''.join(chr(97 + i % 26) for i in range(3000))]
  proto = tokenizers.train_sentencepiece(corpus, 300)
  assert proto == tokenizers.train_sentencepiece(corpus, 300)
  tok = tokenizers.SentencePieceTokenizer(proto, extra_ids=5)
  assert tok.vocab_size == tok.base_size + 5 and tok.sentinel(0) == tok.vocab_size - 1
  assert tok._sp.id_to_piece(tok.mask_id) == '<mask>'
  for text in corpus + ['never seen: Ωμέγα\r\n\t  tabs', '']:
    ids = tok.encode(text)
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.base_size)
    assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *tok.encode('os'), tok.sentinel(1)]) == 'os<extra_id_1>'
  with pytest.raises(ValueError, match='too small'):
    tokenizers.train_sentencepiece(corpus, 100)
