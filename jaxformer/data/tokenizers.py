"""Tokenizers: bytes (built in), a fixed word vocabulary (ListOps), SentencePiece (trained).

Every tokenizer has the same special-token layout at the bottom of the vocabulary and T5-style
sentinels at the top:

  id 0 pad, 1 bos, 2 eos, 3 mask, then the tokenizer's own ids, then `extra_ids` sentinels,
  sentinel(i) = vocab_size - 1 - i (T5's <extra_id_i>).

- `ByteTokenizer`: byte b -> id b + 4, so ids 4..259 are the 256 bytes and
  vocab_size = 260 + extra_ids. `decode_bytes(encode(b)) == b` for any bytes, and
  `decode(encode(s)) == s` for any str (UTF-8).
- `VocabTokenizer`: whitespace-separated words from a fixed list (ListOps: digits, operators
  and ']'); id 4 is unk, words start at 5.
- `SentencePieceTokenizer`: a unigram or BPE model trained on a corpus (Kudo & Richardson 2018)
  with identity normalisation, whitespace kept and byte fallback (characters outside the
  99.95% coverage become byte pieces), so any text, code included, round-trips exactly;
  SentencePiece's own ids are pad 0, bos 1, eos 2, unk 3 and the user symbol <mask> = 4
  (mask_id = 4 here, unlike the other two).

`regular_ids` is the id range of ordinary tokens (MLM draws random replacements from it).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, MASK = 0, 1, 2, 3


class Tokenizer:
  """Shared special ids and sentinel arithmetic; subclasses implement encode/decode."""

  pad_id = PAD
  bos_id = BOS
  eos_id = EOS
  mask_id = MASK
  char_level = False  # one token per input character (tasks with per-character masks need it)

  def __init__(self, base_size: int, extra_ids: int):
    if extra_ids < 0:
      raise ValueError(f'extra_ids={extra_ids} must be >= 0')
    self.base_size = base_size
    self.extra_ids = extra_ids
    self.vocab_size = base_size + extra_ids

  @property
  def regular_ids(self) -> range:
    raise NotImplementedError

  def sentinel(self, i: int) -> int:
    if not 0 <= i < self.extra_ids:
      raise ValueError(f'sentinel {i} out of range: this tokenizer has extra_ids={self.extra_ids}')
    return self.vocab_size - 1 - i

  def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids) >= self.base_size

  def encode(self, text: str | bytes) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def _special_text(self, i: int) -> str:
    if i >= self.base_size:
      return f'<extra_id_{self.vocab_size - 1 - i}>'
    return '<mask>' if i == self.mask_id else ''


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes offset by 4 (after pad, bos, eos, mask)."""

  OFFSET = 4
  char_level = True

  def __init__(self, extra_ids: int = 100):
    super().__init__(self.OFFSET + 256, extra_ids)

  @property
  def regular_ids(self) -> range:
    return range(self.OFFSET, self.OFFSET + 256)

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + self.OFFSET

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
    ids = ids[(ids >= self.OFFSET) & (ids < self.OFFSET + 256)]
    return (ids - self.OFFSET).astype(np.uint8).tobytes()

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the byte ids; mask and sentinels render as <mask>, <extra_id_i>; pad/bos/eos drop."""
    out, run = [], []
    for i in (int(i) for i in ids):
      if self.OFFSET <= i < self.OFFSET + 256:
        run.append(i - self.OFFSET)
        continue
      out.append(bytes(run).decode('utf-8', errors='replace'))
      run = []
      out.append(self._special_text(i))
    out.append(bytes(run).decode('utf-8', errors='replace'))
    return ''.join(out)


class VocabTokenizer(Tokenizer):
  """Whitespace-separated words from a fixed list; id 4 is unk."""

  UNK = 4

  def __init__(self, words: Sequence[str], extra_ids: int = 0):
    self.words = tuple(words)
    self._ids = {w: i + 5 for i, w in enumerate(self.words)}
    super().__init__(5 + len(self.words), extra_ids)

  @property
  def regular_ids(self) -> range:
    return range(5, self.base_size)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return np.asarray([self._ids.get(w, self.UNK) for w in text.split()], np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    words = []
    for i in (int(i) for i in ids):
      if 5 <= i < self.base_size:
        words.append(self.words[i - 5])
      elif i == self.UNK:
        words.append('<unk>')
      elif self._special_text(i):
        words.append(self._special_text(i))
    return ' '.join(words)


class SentencePieceTokenizer(Tokenizer):
  """A trained SentencePiece model plus `extra_ids` sentinels above its pieces."""

  mask_id = 4

  def __init__(self, model_proto: bytes, extra_ids: int = 100):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD, BOS, EOS):
      raise ValueError('SentencePiece model must use pad=0, bos=1, eos=2 (train it with '
                       '`train_sentencepiece`)')
    super().__init__(self._sp.get_piece_size(), extra_ids)

  @property
  def regular_ids(self) -> range:
    return range(5, self.base_size)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    out, run = [], []
    for i in (int(i) for i in ids):
      if 5 <= i < self.base_size or i == 3:
        run.append(i)
        continue
      out.append(self._sp.decode(run))
      run = []
      out.append(self._special_text(i))
    out.append(self._sp.decode(run))
    return ''.join(out)


def _chunks(texts: Iterable[str | bytes], max_chars: int, max_sentence: int = 2048):
  """Splits texts at line ends into pieces SentencePiece accepts, up to max_chars in total."""
  total = 0
  for text in texts:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    piece = ''
    for line in text.splitlines(keepends=True):
      if len(piece) + len(line) > max_sentence and piece:
        yield piece
        total += len(piece)
        piece = ''
      piece += line[:max_sentence]
      if total >= max_chars:
        return
    if piece:
      yield piece
      total += len(piece)
    if total >= max_chars:
      return


def train_sentencepiece(texts: Iterable[str | bytes], vocab_size: int, *,
                        model_type: str = 'unigram', max_chars: int = 20_000_000) -> bytes:
  """Trains a SentencePiece model on `texts` and returns the serialized model.

  Single-threaded so that every host of a multi-host job trains the same model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size < 256 + 5 + 8:
    raise ValueError(f'vocab_size={vocab_size} is too small: byte fallback needs 256 byte pieces '
                     'plus the 5 specials, so use at least 269')
  model = io.BytesIO()
  try:
    _train(spm, texts, model, vocab_size, model_type, max_chars)
  except RuntimeError as e:
    raise ValueError(f'SentencePiece training with vocab_size={vocab_size} failed; byte '
                     'fallback needs 256 byte pieces + 5 specials + one piece per distinct '
                     f'character of the corpus, so a larger vocab may be needed: {e}') from e
  return model.getvalue()


def _train(spm, texts, model, vocab_size, model_type, max_chars):
  spm.SentencePieceTrainer.train(
      sentence_iterator=_chunks(texts, max_chars), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=3,
      user_defined_symbols=['<mask>'], byte_fallback=True, character_coverage=0.9995,
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=4096,
      num_threads=1, hard_vocab_limit=False, minloglevel=2)


def load_or_train_sentencepiece(path: str, texts_fn, vocab_size: int, *, model_type: str,
                                extra_ids: int) -> SentencePieceTokenizer:
  """Loads `path`, or trains on `texts_fn()` and writes it there atomically first."""
  if not os.path.exists(path):
    proto = train_sentencepiece(texts_fn(), vocab_size, model_type=model_type)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(proto)
    os.replace(tmp, path)
  with open(path, 'rb') as f:
    return SentencePieceTokenizer(f.read(), extra_ids=extra_ids)


def fingerprint(*parts) -> str:
  return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]
