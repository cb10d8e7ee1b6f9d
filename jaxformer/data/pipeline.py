"""Grain input pipelines: ArrayRecord source -> shard -> shuffle -> tokenize -> pack -> batch.

`make_pipeline(cfg, split, batch_size=..., seed=...)` returns a `DataIterator` over dicts of
numpy arrays, B = batch size, T = seq_len, S = target_len (decoder length):

  lm (causal LM; documents, or inputs+targets pairs with loss on the targets only):
    inputs, targets, segment_ids, positions: int32 [B, T]; loss_mask: float32 [B, T]
    inputs = [bos] + x, targets = x + [eos] per document (shifted within each segment).
  mlm (BERT / RoBERTa dynamic masking, 80/10/10):
    inputs (masked), targets (original ids), segment_ids, positions: int32 [B, T];
    loss_mask: float32 [B, T], 1 on the selected positions only.
  rtd (ELECTRA): the mlm schema, with ELECTRA's masking: a selected token becomes <mask> with
    probability 0.85 and stays unchanged otherwise (no random tokens).
  seq2seq, span_corruption (T5), denoise (BART):
    encoder_inputs, encoder_segment_ids, encoder_positions: int32 [B, T]
    decoder_inputs, decoder_targets, decoder_segment_ids, decoder_positions: int32 [B, S]
    loss_mask: float32 [B, S]. decoder_inputs = [bos] + y, decoder_targets = y + [eos].
  classification of text: inputs, segment_ids, positions: int32 [B, T] ([bos] text [eos],
    truncated); label: int32 [B]; loss_mask: float32 [B] (0 on padding rows of a final
    partial batch).
  classification of images (a dataset with an image feature, e.g. cifar10):
    images: float32 [B, H, W, C] scaled to [-1, 1]; label: int32 [B]; loss_mask: float32 [B].

Segment ids number the packed sequences of a row from 1 (0 = padding) and positions restart
at 0 in each segment (a document split across rows by `concat` packing restarts at 0 in the
next row). Token ids are checked to lie in [0, tokenizer.vocab_size) on every batch.

Order and determinism: the split is sharded first (`source[shard_index::shard_count]`, so
processes see disjoint examples that together cover the split), then shuffled with `seed`
(a different permutation every epoch), repeated (`num_epochs=None`: forever), and random noise
(masks, spans) is drawn from generators seeded by (seed, shard, element index), so it is new
every epoch and reproducible. `DataIterator.get_state()` is JSON bytes that
`set_state` restores to produce exactly the same next batches; it plugs into Orbax through
`grain.checkpoint.CheckpointSave(item=iterator)`. With `num_epochs` set, the last partial batch
is padded with all-zero rows (masks 0) so shapes stay static. `start_index` starts reading at
that index of the shard's shuffled, repeated example stream, and `stream_position()` says where
a pipeline has got to in that stream, so a sequence-length curriculum
(`jaxformer.data.curriculum`) continues the stream at another row length.

Prefetch: `cfg.read_threads` threads read and tokenize, `cfg.prefetch` batches are prepared
ahead in a background thread; `cfg.worker_count > 0` moves the work into grain worker
processes (each packs its own slice of the stream, so the batches differ from the in-process
ones, and a saved state restores only with the same worker_count).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import grain
from absl import flags
import numpy as np

from jaxformer.config import ConfigError
from jaxformer.data import builders
from jaxformer.data import listops
from jaxformer.data import sources
from jaxformer.data import tokenizers
from jaxformer.data import transforms
from jaxformer.data.config import DataConfig
from jaxformer.data.sources import DataUnavailableError

TOKEN_KEYS = ('inputs', 'targets', 'encoder_inputs', 'decoder_inputs', 'decoder_targets')


class DataStateError(ValueError):
  """A saved data position does not fit this run's pipeline (another batch size, row length,
  shard count or curriculum); refused rather than read as an unreadable checkpoint."""


def make_tokenizer(cfg: DataConfig) -> tokenizers.Tokenizer:
  """The tokenizer `cfg.tokenizer` names; SentencePiece is trained on the train split once."""
  if cfg.tokenizer == 'byte':
    return tokenizers.ByteTokenizer(extra_ids=cfg.extra_ids)
  if cfg.tokenizer == 'listops':
    return tokenizers.VocabTokenizer(listops.TOKENS, extra_ids=cfg.extra_ids)
  feats = sources.feature_map(cfg)
  base = cfg.name.partition('/')[0]
  dataset = cfg.name
  if base in builders.BUILDERS:  # options change the data, so they name the model too
    dataset = f'{base}/{builders.configure(cfg.name, cfg.builder_config)[1].name}'
  tag = tokenizers.fingerprint(dataset, cfg.train_split, sorted(feats.items()))
  path = os.path.join(sources.data_dir(cfg), 'sentencepiece',
                      f'{cfg.name.replace("/", "_")}_{cfg.spm_model_type}{cfg.spm_vocab_size}'
                      f'_{tag}.model')

  def corpus():
    source, _ = sources.load(cfg, cfg.train_split)
    return sources.texts(source, feats)

  return tokenizers.load_or_train_sentencepiece(
      path, corpus, cfg.spm_vocab_size, model_type=cfg.spm_model_type, extra_ids=cfg.extra_ids)


class DataIterator:
  """A checkpointable iterator of batches (see the module docstring for the schema)."""

  def __init__(self, dataset: grain.IterDataset, *, tokenizer: tokenizers.Tokenizer | None,
               fingerprint: dict[str, Any], seq_len: int, target_len: int | None,
               start_index: int = 0):
    self._dataset = dataset
    # The grain iterator lives in a list that a finalizer empties (at collection or at exit),
    # so grain's own __del__ runs while the interpreter is intact, not during teardown.
    self._holder = [iter(dataset)]
    weakref.finalize(self, _release, self._holder)
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size if tokenizer is not None else None
    self.seq_len = seq_len
    self.target_len = target_len
    self.start_index = start_index
    self.fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._holder[0])

  def get_state(self) -> bytes:
    return json.dumps({'pipeline': self.fingerprint,
                       'grain': self._holder[0].get_state()}).encode()

  def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if 'curriculum' in state:
      raise DataStateError(
          'the data position was saved by a run with a sequence-length curriculum '
          '(train.curriculum); resume it with the same train.curriculum')
    if state.get('pipeline') != self.fingerprint:
      raise DataStateError(
          'the data iterator state was saved by a different pipeline: saved '
          f'{state.get("pipeline")}, this one is {self.fingerprint}')
    self._holder[0].set_state(_grain_state(state['grain']))

  def stream_position(self) -> int:
    """Where this pipeline would read again from, in its shard's shuffled and repeated example
    stream, to rebuild its state: the batches served so far used up every example before it,
    and none after. With concat packing it is the first example the last row was cut from,
    with first_fit packing the first example of the packing window being emitted, unpacked the
    next example. Read from grain's iterator state (its innermost source position), which
    covers the served batches exactly, whatever was prefetched."""
    node = self._holder[0].get_state()
    while isinstance(node, Mapping) and 'next_index' not in node:
      parents = [node[k] for k in ('parent', 'parent_state') if k in node]
      if len(parents) != 1:
        raise RuntimeError(
            f'cannot find the source position in the data iterator state {node!r}: grain '
            "changed its state format, or data.worker_count > 0 (each worker has its own)")
      node = parents[0]
    if not isinstance(node, Mapping):
      raise RuntimeError(f'the data iterator state has no source position: {node!r}')
    return self.start_index + int(node['next_index'])

  def start_prefetch(self) -> None:
    self._holder[0].start_prefetch()

  def close(self) -> None:
    _release(self._holder)


def _grain_state(state: Any) -> Any:
  """A grain state read back from JSON, with the packers' slices as tuples again.

  grain's concat packer tells "no remainder" by comparing each slice with the tuple (-1, -1);
  JSON gives a list back, which compares unequal, so a state saved while the packer held no
  remainder would restore reading one example too many (and every batch after it shifted).
  """
  if isinstance(state, Mapping):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == 'remainder_slices'
                else _grain_state(v)) for k, v in state.items()}
  return state


def _release(holder: list) -> None:
  if holder:
    holder.pop().close()


def _fold(*parts) -> int:
  return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], 'little')


def _pad(x: np.ndarray, length: int, value: int = 0) -> np.ndarray:
  x = np.asarray(x)[:length]
  return np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _single_segment(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(padded tokens, segment ids, positions) for one unpacked sequence."""
  n = min(len(x), length)
  segment = (np.arange(length) < n).astype(np.int32)
  positions = np.where(segment, np.arange(length), 0).astype(np.int32)
  return _pad(x, length).astype(np.int32), segment, positions


class _Encoder:
  """Reads canonical features out of a raw example and tokenizes them."""

  def __init__(self, tok: tokenizers.Tokenizer, feats: Mapping[str, str]):
    self.tok = tok
    self.feats = feats

  def text(self, example, key: str) -> np.ndarray:
    parts = [self.tok.encode(example[name]) for name in self.feats[key].split(',')]
    eos = np.asarray([self.tok.eos_id], np.int32)
    out = [parts[0]]
    for p in parts[1:]:
      out += [eos, p]
    return np.concatenate(out).astype(np.int32)


def _pack(ds: grain.IterDataset, packing: str, lengths: dict[str, int], cfg: DataConfig,
          seed: int) -> grain.IterDataset:
  """Packs elements of 1-D int32 features; adds <feature>_segment_ids / _positions."""
  if packing == 'concat':
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  if packing == 'first_fit':
    ds = ds.map(lambda ex: {k: v[:lengths[k]] for k, v in ex.items()})
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=cfg.num_packing_bins, seed=seed,
        shuffle_bins=False)

  def single(ex):
    out = {}
    for k, v in ex.items():
      out[k], out[f'{k}_segment_ids'], out[f'{k}_positions'] = _single_segment(v, lengths[k])
    return out

  return ds.map(single)


def _lm(ds, enc: _Encoder, cfg: DataConfig, seq_len: int, seed: int):
  tok = enc.tok
  bos, eos = np.int32([tok.bos_id]), np.int32([tok.eos_id])

  def element(ex):
    if 'text' in enc.feats:
      x = enc.text(ex, 'text')
      weight = np.ones(len(x) + 1, np.int32)
    else:
      a, b = enc.text(ex, 'inputs'), enc.text(ex, 'targets')
      x = np.concatenate([a, b])
      if 'answer_mask' in enc.feats:
        answer = np.asarray(ex[enc.feats['answer_mask']], np.int32)
        if len(answer) != len(b):
          raise ValueError(f'{cfg.name}: answer_mask has {len(answer)} entries for {len(b)} '
                           'target tokens; use a character-level tokenizer (byte)')
        weight = np.concatenate([np.zeros(len(a), np.int32), answer, [0]])
      else:
        weight = np.concatenate([np.zeros(len(a), np.int32), np.ones(len(b) + 1, np.int32)])
    return {'inputs': np.concatenate([bos, x]), 'targets': np.concatenate([x, eos]),
            'loss_mask': weight.astype(np.int32)}

  lengths = {'inputs': seq_len, 'targets': seq_len, 'loss_mask': seq_len}
  ds = _pack(ds.map(element), cfg.resolved_packing, lengths, cfg, seed)
  return ds.map(lambda p: {
      'inputs': p['inputs'], 'targets': p['targets'],
      'segment_ids': p['inputs_segment_ids'], 'positions': p['inputs_positions'],
      'loss_mask': (p['loss_mask'] * (p['inputs_segment_ids'] > 0)).astype(np.float32)})


def _mlm(ds, enc: _Encoder, cfg: DataConfig, seq_len: int, seed: int):
  tok = enc.tok
  replace = (0.85, 0.0) if cfg.task == 'rtd' else (0.8, 0.1)
  specials = np.asarray([tok.pad_id, tok.bos_id, tok.eos_id], np.int32)

  def element(ex):
    return {'tokens': np.concatenate([[tok.bos_id], enc.text(ex, 'text'), [tok.eos_id]]
                                     ).astype(np.int32)}

  def mask(p, rng):
    tokens, segment = p['tokens'], p['tokens_segment_ids']
    eligible = (segment > 0) & ~np.isin(tokens, specials) & ~tok.is_sentinel(tokens)
    inputs, targets, selected = transforms.mlm_mask(
        tokens, rng, mask_id=tok.mask_id, regular_ids=tok.regular_ids, eligible=eligible,
        probability=cfg.mlm_probability, replace=replace)
    return {'inputs': inputs, 'targets': targets, 'segment_ids': segment,
            'positions': p['tokens_positions'], 'loss_mask': selected.astype(np.float32)}

  ds = _pack(ds.map(element), cfg.resolved_packing, {'tokens': seq_len}, cfg, seed)
  return ds.random_map(mask, seed=_fold(seed, 'mlm'))


def _encoder_decoder(enc_in, dec_target, tok, seq_len, target_len) -> dict[str, np.ndarray]:
  """Pads one unpacked encoder-decoder pair; decoder_inputs = [bos] + targets[:-1]."""
  dec_in = np.concatenate([[tok.bos_id], dec_target[:-1]]).astype(np.int32)
  e, e_seg, e_pos = _single_segment(enc_in, seq_len)
  d, d_seg, d_pos = _single_segment(dec_target, target_len)
  return {'encoder_inputs': e, 'encoder_segment_ids': e_seg, 'encoder_positions': e_pos,
          'decoder_inputs': _pad(dec_in, target_len).astype(np.int32), 'decoder_targets': d,
          'decoder_segment_ids': d_seg, 'decoder_positions': d_pos,
          'loss_mask': d_seg.astype(np.float32)}


def _seq2seq(ds, enc: _Encoder, cfg: DataConfig, seq_len: int, target_len: int, seed: int):
  tok = enc.tok

  def element(ex):
    a, b = enc.text(ex, 'inputs'), enc.text(ex, 'targets')
    return {'encoder_inputs': np.concatenate([a, [tok.eos_id]]).astype(np.int32),
            'decoder_inputs': np.concatenate([[tok.bos_id], b]).astype(np.int32),
            'decoder_targets': np.concatenate([b, [tok.eos_id]]).astype(np.int32)}

  lengths = {'encoder_inputs': seq_len, 'decoder_inputs': target_len,
             'decoder_targets': target_len}
  ds = _pack(ds.map(element), cfg.resolved_packing, lengths, cfg, seed)
  return ds.map(lambda p: {
      'encoder_inputs': p['encoder_inputs'],
      'encoder_segment_ids': p['encoder_inputs_segment_ids'],
      'encoder_positions': p['encoder_inputs_positions'],
      'decoder_inputs': p['decoder_inputs'], 'decoder_targets': p['decoder_targets'],
      'decoder_segment_ids': p['decoder_targets_segment_ids'],
      'decoder_positions': p['decoder_targets_positions'],
      'loss_mask': (p['decoder_targets_segment_ids'] > 0).astype(np.float32)})


def _chunks(ds, enc: _Encoder, cfg: DataConfig, length: int, seed: int):
  """Documents + EOS, concatenated and cut into `length`-token chunks (or one per document)."""
  tok = enc.tok
  ds = ds.map(lambda ex: {'tokens': np.concatenate([enc.text(ex, 'text'), [tok.eos_id]]
                                                   ).astype(np.int32)})
  return _pack(ds, cfg.resolved_packing, {'tokens': length}, cfg, seed)


def _span_corruption(ds, enc: _Encoder, cfg: DataConfig, seq_len: int, seed: int):
  tok = enc.tok
  raw_len, target_len = transforms.span_corruption_lengths(
      seq_len, cfg.noise_density, cfg.mean_noise_span_length)

  def corrupt(p, rng):
    tokens = p['tokens'][p['tokens_segment_ids'] > 0]
    inputs, targets = transforms.span_corruption(
        tokens, rng, tok.sentinel, noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length)
    return _encoder_decoder(np.concatenate([inputs, [tok.eos_id]]),
                            np.concatenate([targets, [tok.eos_id]]), tok, seq_len, target_len)

  ds = _chunks(ds, enc, cfg, raw_len, seed)
  return ds.random_map(corrupt, seed=_fold(seed, 'span_corruption')), target_len


def _denoise(ds, enc: _Encoder, cfg: DataConfig, seq_len: int, target_len: int, seed: int):
  tok = enc.tok
  ends = {tok.eos_id} | {int(i[0]) for c in '.!?\n' if len(i := tok.encode(c)) == 1}

  def noise(p, rng):
    tokens = p['tokens'][p['tokens_segment_ids'] > 0]
    noised = transforms.bart_noise(
        tokens, rng, mask_id=tok.mask_id, mask_ratio=cfg.bart_mask_ratio,
        poisson_lambda=cfg.bart_poisson_lambda, permute_sentences=cfg.bart_permute_sentences,
        sentence_ends=ends)
    enc_in = np.concatenate([noised[:seq_len - 1], [tok.eos_id]])
    return _encoder_decoder(enc_in, np.concatenate([tokens, [tok.eos_id]]), tok, seq_len,
                            target_len)

  ds = _chunks(ds, enc, cfg, target_len - 1, seed)
  return ds.random_map(noise, seed=_fold(seed, 'denoise'))


def _classification(ds, enc: _Encoder, cfg: DataConfig, seq_len: int):
  tok = enc.tok

  def element(ex):
    x = np.concatenate([[tok.bos_id], enc.text(ex, 'text'), [tok.eos_id]])
    inputs, segment, positions = _single_segment(x, seq_len)
    return {'inputs': inputs, 'segment_ids': segment, 'positions': positions,
            'label': np.int32(ex[enc.feats['label']]), 'loss_mask': np.float32(1.0)}

  return ds.map(element)


def _images(ds, enc: _Encoder):
  def element(ex):
    image = np.asarray(ex[enc.feats['image']], np.float32) / 127.5 - 1.0
    return {'images': image, 'label': np.int32(ex[enc.feats['label']]),
            'loss_mask': np.float32(1.0)}

  return ds.map(element)


def _pad_batch(batch_size: int) -> Callable:
  def pad(batch):
    n = len(next(iter(batch.values())))
    if n == batch_size:
      return batch
    return {k: _pad(v, batch_size) for k, v in batch.items()}
  return pad


def _check_ids(vocab_size: int) -> Callable:
  def check(batch):
    for key in TOKEN_KEYS:
      if key in batch and batch[key].size:
        lo, hi = int(batch[key].min()), int(batch[key].max())
        if lo < 0 or hi >= vocab_size:
          raise ValueError(f'batch[{key!r}] has token ids outside [0, {vocab_size}): '
                           f'min={lo}, max={hi}')
    return batch
  return check


def make_pipeline(cfg: DataConfig, split: str, *, batch_size: int, seq_len: int | None = None,
                  seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                  tokenizer: tokenizers.Tokenizer | None = None, shuffle: bool = True,
                  num_epochs: int | None = None, start_index: int = 0) -> DataIterator:
  """Builds the batch iterator for one split; raises before any compilation if data is missing.

  Args:
    cfg: the data config.
    split: a TFDS split ('train', 'validation', 'test', or a slice such as 'train[:10%]').
    batch_size: examples per batch on this process.
    seq_len: row length (encoder length); defaults to cfg.seq_len (a curriculum may vary it).
    seed: shuffling and noise seed.
    shard_index, shard_count: this process's shard (jax.process_index(), jax.process_count()).
    tokenizer: overrides `make_tokenizer(cfg)`.
    shuffle: shuffle examples (reshuffled every epoch).
    num_epochs: None repeats forever (training); 1 for one evaluation pass.
    start_index: where to start in the shard's shuffled, repeated example stream (a
      curriculum stage continues where the previous one stopped; `stream_position`).
  """
  seq_len = seq_len or cfg.seq_len
  if batch_size <= 0:
    raise ConfigError(f'batch_size={batch_size!r} is invalid: must be a positive integer')
  if not 0 <= shard_index < shard_count:
    raise ConfigError(f'shard_index={shard_index} is invalid: must be in [0, {shard_count})')
  if num_epochs is not None and num_epochs <= 0:
    raise ConfigError(f'num_epochs={num_epochs!r} is invalid: must be positive or None')
  if start_index < 0 or (start_index and num_epochs is not None):
    raise ConfigError(f'start_index={start_index!r} is invalid: must be >= 0, and 0 unless the '
                      'stream repeats forever (num_epochs=None)')
  source, features = sources.load(cfg, split)
  feats = sources.task_features(cfg, features.keys())
  if 'answer_mask' in feats and not (tokenizer.char_level if tokenizer
                                     else cfg.tokenizer == 'byte'):
    raise ConfigError(f'data.tokenizer={cfg.tokenizer!r} is invalid for {cfg.name}: its '
                      'answer_mask is per character, so it needs a character-level tokenizer '
                      "('byte')")
  tok = tokenizer or (None if 'image' in feats else make_tokenizer(cfg))
  target_len = None
  if cfg.task == 'span_corruption':
    raw_len, target_len = transforms.span_corruption_lengths(
        seq_len, cfg.noise_density, cfg.mean_noise_span_length)
    spans = transforms.num_noise_spans(raw_len, cfg.noise_density, cfg.mean_noise_span_length)
    if spans > tok.extra_ids:
      raise ConfigError(f'data.extra_ids={tok.extra_ids} is invalid: span corruption of '
                        f'seq_len={seq_len} needs {spans} sentinel ids')
  elif cfg.task in ('seq2seq', 'denoise'):
    target_len = cfg.target_len or seq_len
  if len(source) < shard_count:
    raise DataUnavailableError(f'{cfg.name}[{split}] has {len(source)} examples, fewer than '
                               f'shard_count={shard_count}')

  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=_fold(seed, 'shuffle'))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if start_index:
    ds = ds[start_index:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=max(4 * batch_size, 16)))
  enc = _Encoder(tok, feats)
  noise_seed = _fold(seed, shard_index)
  if cfg.task == 'lm':
    ds = _lm(ds, enc, cfg, seq_len, noise_seed)
  elif cfg.task in ('mlm', 'rtd'):
    ds = _mlm(ds, enc, cfg, seq_len, noise_seed)
  elif cfg.task == 'seq2seq':
    ds = _seq2seq(ds, enc, cfg, seq_len, target_len, noise_seed)
  elif cfg.task == 'span_corruption':
    ds, _ = _span_corruption(ds, enc, cfg, seq_len, noise_seed)
  elif cfg.task == 'denoise':
    ds = _denoise(ds, enc, cfg, seq_len, target_len, noise_seed)
  elif 'image' in feats:
    ds = _images(ds, enc)
  else:
    ds = _classification(ds, enc, cfg, seq_len)
  ds = ds.batch(batch_size, drop_remainder=False)
  if num_epochs is not None:
    ds = ds.map(_pad_batch(batch_size))
  if tok is not None:
    ds = ds.map(_check_ids(tok.vocab_size))
  if cfg.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (set outside absl.app)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  elif cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  fingerprint = {
      'name': cfg.name, 'builder_config': dict(cfg.builder_config), 'split': split,
      'task': cfg.task, 'batch_size': batch_size, 'seq_len': seq_len, 'seed': seed,
      'shard': [shard_index, shard_count], 'worker_count': cfg.worker_count,
      'vocab_size': tok.vocab_size if tok else None}
  if start_index:  # absent at 0, so states saved before the field existed still restore
    fingerprint['start_index'] = start_index
  return DataIterator(ds, tokenizer=tok, fingerprint=json.loads(json.dumps(fingerprint)),
                      seq_len=seq_len, target_len=target_len, start_index=start_index)

