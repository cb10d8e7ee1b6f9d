"""Grain pipelines: packing, objectives, sharding, checkpointed iterator state, errors."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from jaxformer.config import ConfigError
from jaxformer.data import DataConfig, DataUnavailableError, listops, make_pipeline
from jaxformer.data import make_tokenizer, pipeline, sources, transforms
from jaxformer.data.tokenizers import ByteTokenizer

STDLIB = 'python_stdlib/small'


def _epoch(it):
  return list(it)


def _docs(cfg, split='train'):
  source, _ = sources.load(cfg, split)
  return [source[i] for i in range(len(source))]


def _check_segments(segment, positions):
  """Segment ids count up from 1 per row, positions restart at 0, padding only at the end."""
  for seg, pos in zip(segment, positions):
    n = int((seg > 0).sum())
    if n == 0:  # a padding row of the final batch
      continue
    assert (seg[n:] == 0).all() and (pos[n:] == 0).all() and (seg[:n] > 0).all()
    assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
    for s in np.unique(seg[:n]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))


def test_lm_concat_packing_keeps_every_token(make_cfg):
  cfg = make_cfg(name=STDLIB, task='lm', seq_len=64)
  it = make_pipeline(cfg, 'validation', batch_size=4, shuffle=False, num_epochs=1)
  tok = it.tokenizer
  batches = _epoch(it)
  stream_t, stream_i = [], []
  for b in batches:
    assert b['inputs'].shape == (4, 64) and b['loss_mask'].dtype == np.float32
    _check_segments(b['segment_ids'], b['positions'])
    valid = b['segment_ids'] > 0
    np.testing.assert_array_equal(b['loss_mask'], valid.astype(np.float32))
    # Next-token shift inside each segment: inputs[t] == targets[t - 1].
    same = valid[:, 1:] & (b['segment_ids'][:, 1:] == b['segment_ids'][:, :-1])
    np.testing.assert_array_equal(b['inputs'][:, 1:][same], b['targets'][:, :-1][same])
    stream_t += list(b['targets'][valid])
    stream_i += list(b['inputs'][valid])
  docs = [tok.encode(d['text']) for d in _docs(cfg, 'validation')]
  np.testing.assert_array_equal(stream_t, np.concatenate([np.append(d, 2) for d in docs]))
  np.testing.assert_array_equal(stream_i, np.concatenate([np.insert(d, 0, 1) for d in docs]))


def test_seq2seq_first_fit_packs_whole_examples(make_cfg, splits):
  cfg = make_cfg(name='synthetic_seq2seq/reverse', task='seq2seq', seq_len=48, target_len=40,
                 builder_config=splits)
  it = make_pipeline(cfg, 'train', batch_size=8, shuffle=False, num_epochs=1)
  tok = it.tokenizer
  pairs = []
  for b in _epoch(it):
    assert b['encoder_inputs'].shape == (8, 48) and b['decoder_targets'].shape == (8, 40)
    _check_segments(b['encoder_segment_ids'], b['encoder_positions'])
    _check_segments(b['decoder_segment_ids'], b['decoder_positions'])
    for row in range(8):
      eseg, dseg = b['encoder_segment_ids'][row], b['decoder_segment_ids'][row]
      assert set(np.unique(eseg[eseg > 0])) == set(np.unique(dseg[dseg > 0]))
      for s in np.unique(eseg[eseg > 0]):
        x, y = b['encoder_inputs'][row][eseg == s], b['decoder_targets'][row][dseg == s]
        y_in = b['decoder_inputs'][row][dseg == s]
        assert x[-1] == tok.eos_id and y[-1] == tok.eos_id and y_in[0] == tok.bos_id
        np.testing.assert_array_equal(y_in[1:], y[:-1])
        assert tok.decode(y) == tok.decode(x)[::-1]
        pairs.append(tok.decode(x))
    np.testing.assert_array_equal(b['loss_mask'], b['decoder_segment_ids'] > 0)
  assert sorted(pairs) == sorted(d['inputs'].decode() for d in _docs(cfg))


def test_shards_are_disjoint_and_cover_the_split(make_cfg, listops_options):
  cfg = make_cfg(name='listops', task='classification', tokenizer='listops', seq_len=128,
                 builder_config=listops_options)
  seen = []
  for shard in range(3):
    it = make_pipeline(cfg, 'train', batch_size=16, seed=3, shard_index=shard, shard_count=3,
                       num_epochs=1)
    texts = []
    for b in _epoch(it):
      for row in np.flatnonzero(b['loss_mask']):
        text = it.tokenizer.decode(b['inputs'][row])
        assert listops.evaluate(text) == b['label'][row]
        texts.append(text)
      assert (b['inputs'][b['loss_mask'] == 0] == 0).all()  # padding rows of the last batch
    seen.append(set(texts))
    assert len(texts) == len(seen[-1])
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set().union(*seen) == {d['text'].decode() for d in _docs(cfg)}


@pytest.mark.parametrize('task,name,extra', [
    ('lm', STDLIB, {}),
    ('mlm', STDLIB, {}),
    ('span_corruption', STDLIB, {}),
    ('denoise', STDLIB, {'bart_permute_sentences': True}),
    ('seq2seq', 'synthetic_seq2seq/copy', {}),
])
def test_iterator_state_restores_the_next_batches(make_cfg, splits, task, name, extra):
  builder_config = splits if name.startswith('synthetic') else {}
  cfg = make_cfg(name=name, task=task, seq_len=32, builder_config=builder_config, **extra)
  it = make_pipeline(cfg, 'train', batch_size=3, seed=11)
  for _ in range(4):
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = [next(it) for _ in range(5)]
  fresh = make_pipeline(cfg, 'train', batch_size=3, seed=11)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = make_pipeline(cfg, 'train', batch_size=4, seed=11)
  with pytest.raises(ValueError, match='different pipeline'):
    other.set_state(state)


def test_shuffling_is_seeded(make_cfg, splits):
  cfg = make_cfg(name='synthetic_seq2seq/copy', task='seq2seq', seq_len=40,
                 builder_config=splits, packing='none')
  first = lambda seed: next(make_pipeline(cfg, 'train', batch_size=6, seed=seed))
  np.testing.assert_array_equal(first(1)['encoder_inputs'], first(1)['encoder_inputs'])
  assert not np.array_equal(first(1)['encoder_inputs'], first(2)['encoder_inputs'])


def test_mlm_masks_change_every_epoch(make_cfg, splits):
  cfg = make_cfg(name='synthetic_seq2seq/copy', task='mlm', seq_len=40, packing='none',
                 features={'text': 'inputs'}, builder_config=splits)
  it = make_pipeline(cfg, 'test', batch_size=40, shuffle=False, num_epochs=2)
  one, two = next(it), next(it)
  np.testing.assert_array_equal(one['targets'], two['targets'])
  assert not np.array_equal(one['loss_mask'], two['loss_mask'])
  for b in (one, two):
    sel = b['loss_mask'] > 0
    assert (b['inputs'][~sel] == b['targets'][~sel]).all()
    assert not np.isin(b['targets'][sel], [0, 1, 2]).any()  # specials are never selected
    assert (b['segment_ids'][sel] > 0).all()
  rate = np.mean([b['loss_mask'][b['segment_ids'] > 0].mean() for b in (one, two)])
  assert 0.08 < rate < 0.22


def test_rtd_batches_have_the_mlm_schema_with_electra_masking(make_cfg, splits):
  cfg = make_cfg(name='synthetic_seq2seq/copy', task='rtd', seq_len=40, packing='none',
                 features={'text': 'inputs'}, builder_config=splits)
  it = make_pipeline(cfg, 'test', batch_size=40, shuffle=False, num_epochs=1)
  b = next(it)
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  sel = b['loss_mask'] > 0
  assert (b['inputs'][~sel] == b['targets'][~sel]).all()
  masked = b['inputs'][sel] == it.tokenizer.mask_id
  assert (b['inputs'][sel][~masked] == b['targets'][sel][~masked]).all()  # no random tokens
  assert 0.7 < masked.mean() < 0.97 and sel.sum() > 20


def test_span_corruption_pipeline_reconstructs_the_text(make_cfg):
  cfg = make_cfg(name=STDLIB, task='span_corruption', seq_len=64)
  it = make_pipeline(cfg, 'validation', batch_size=4, shuffle=False, num_epochs=1)
  tok = it.tokenizer
  raw_len, target_len = transforms.span_corruption_lengths(64)
  stream = []
  for b in _epoch(it):
    assert b['decoder_targets'].shape == (4, target_len)
    for row in range(4):
      enc = b['encoder_inputs'][row][b['encoder_segment_ids'][row] > 0]
      dec = b['decoder_targets'][row][b['decoder_segment_ids'][row] > 0]
      if not len(enc):
        continue
      assert enc[-1] == tok.eos_id and dec[-1] == tok.eos_id
      chunk = transforms.merge_span_corruption(enc[:-1], dec[:-1], lambda t: t >= tok.base_size)
      assert len(chunk) <= raw_len
      stream += list(chunk)
  docs = [tok.encode(d['text']) for d in _docs(cfg, 'validation')]
  np.testing.assert_array_equal(stream, np.concatenate([np.append(d, 2) for d in docs]))


def test_denoise_pipeline(make_cfg):
  cfg = make_cfg(name=STDLIB, task='denoise', seq_len=64)
  it = make_pipeline(cfg, 'validation', batch_size=4, shuffle=False, num_epochs=1)
  tok = it.tokenizer
  for b in _epoch(it)[:3]:
    for row in range(4):
      target = b['decoder_targets'][row][b['decoder_segment_ids'][row] > 0]
      noised = b['encoder_inputs'][row][b['encoder_segment_ids'][row] > 0]
      assert target[-1] == tok.eos_id and noised[-1] == tok.eos_id
      kept = noised[:-1][noised[:-1] != tok.mask_id]
      assert len(kept) == len(target) - 1 - int(np.ceil(0.3 * (len(target) - 1)))
      i = 0  # kept tokens form a subsequence of the original chunk
      for t in kept:
        while target[i] != t:
          i += 1
        i += 1
      np.testing.assert_array_equal(b['decoder_inputs'][row][1:len(target)], target[:-1])


def test_mqar_lm_loss_counts_only_the_answers(make_cfg, splits):
  cfg = make_cfg(name='mqar', task='lm', seq_len=80, packing='none', builder_config=splits)
  b = next(make_pipeline(cfg, 'test', batch_size=5, shuffle=False))
  tok = ByteTokenizer()
  for row in range(5):
    n = int(b['segment_ids'][row].sum())
    text = tok.decode(b['inputs'][row][:n])
    pairs = dict(zip(text[0:16:2], text[1:16:2]))
    answers = b['targets'][row][b['loss_mask'][row] > 0]
    asked = b['inputs'][row][b['loss_mask'][row] > 0]  # the key precedes its value
    assert len(answers) == 8
    assert [pairs[tok.decode([k])] for k in asked] == [tok.decode([v]) for v in answers]


def test_sentencepiece_pipeline(make_cfg, splits):
  cfg = make_cfg(name='synthetic_seq2seq/copy', task='seq2seq', seq_len=40, tokenizer='spm',
                 spm_vocab_size=300, extra_ids=4, builder_config=splits)
  tok = make_tokenizer(cfg)
  assert os.listdir(os.path.join(sources.data_dir(cfg), 'sentencepiece'))
  assert make_tokenizer(cfg).model_proto == tok.model_proto  # cached, not retrained
  it = make_pipeline(cfg, 'validation', batch_size=4, shuffle=False, num_epochs=1)
  assert it.vocab_size == tok.vocab_size
  pairs = set()
  for b in it:
    assert b['encoder_inputs'].max() < tok.base_size  # no sentinels in plain seq2seq
    for row in range(4):
      for s in set(b['encoder_segment_ids'][row]) - {0}:
        x = b['encoder_inputs'][row][b['encoder_segment_ids'][row] == s]
        y = b['decoder_targets'][row][b['decoder_segment_ids'][row] == s]
        assert tok.decode(x) == tok.decode(y)  # copy task, through SentencePiece
        pairs.add(tok.decode(x))
  assert pairs == {d['inputs'].decode() for d in _docs(cfg, 'validation')}


def test_token_ids_are_checked():
  check = pipeline._check_ids(10)
  check({'inputs': np.asarray([[0, 9]]), 'label': np.asarray([12])})
  with pytest.raises(ValueError, match=r"batch\['decoder_targets'\].*\[0, 10\)"):
    check({'decoder_targets': np.asarray([[3, 10]])})


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A stand-in for cifar10, prepared locally (an Image feature would need TF to encode)."""

  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(10):
      yield i, {'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 'label': i}


def test_prepared_tfds_dataset_and_image_batches(data_dir):
  TinyImages(data_dir=data_dir, file_format='array_record').download_and_prepare()
  cfg = DataConfig(name='tiny_images', task='classification', data_dir=data_dir,
                   features={'image': 'image', 'label': 'label'}, download=False)
  batches = list(make_pipeline(cfg, 'train', batch_size=4, num_epochs=1))
  assert len(batches) == 3
  for b in batches:
    assert b['images'].shape == (4, 8, 8, 3) and b['images'].dtype == np.float32
    assert -1.0 <= b['images'].min() and b['images'].max() <= 1.0
  labels = np.concatenate([b['label'][b['loss_mask'] > 0] for b in batches])
  assert sorted(labels) == list(range(10))


class TinyPngs(TinyImages):
  """Image features are PNG-encoded by TensorFlow at preparation time."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))


def test_preparation_that_needs_tensorflow_says_so(make_cfg, monkeypatch):
  assert importlib.util.find_spec('tensorflow') is None  # the project runs without it
  monkeypatch.setattr(sources, '_online', lambda timeout=3.0: True)
  cfg = make_cfg(name='tiny_pngs', task='classification')
  with pytest.raises(DataUnavailableError, match="builder for tiny_pngs needs TensorFlow to "
                                                 "prepare the data.*--file_format=array_record"):
    make_pipeline(cfg, 'train', batch_size=2)


def test_missing_data_fails_with_actionable_messages(make_cfg, monkeypatch):
  with pytest.raises(DataUnavailableError, match="unknown dataset 'no_such_set'"):
    make_pipeline(make_cfg(name='no_such_set'), 'train', batch_size=2)
  cfg = make_cfg(name='tiny_shakespeare', download=False)
  with pytest.raises(DataUnavailableError,
                     match=f'tiny_shakespeare is not prepared in {cfg.data_dir}.*'
                           'TFDS_DATA_DIR'):
    make_pipeline(cfg, 'train', batch_size=2)
  monkeypatch.setattr(sources, '_online', lambda timeout=3.0: False)
  with pytest.raises(DataUnavailableError, match='this machine cannot download it'):
    make_pipeline(make_cfg(name='imdb_reviews', task='classification'), 'train', batch_size=2)
  with pytest.raises(ConfigError, match=r"split='dev' is invalid.*'train'"):
    make_pipeline(make_cfg(name=STDLIB), 'dev', batch_size=2)
  with pytest.raises(ConfigError, match='task .seq2seq. reads inputs\\+targets'):
    make_pipeline(make_cfg(name=STDLIB, task='seq2seq'), 'train', batch_size=2)
  with pytest.raises(ConfigError, match='character-level tokenizer'):
    make_pipeline(make_cfg(name='mqar', tokenizer='spm'), 'train', batch_size=2)


def test_data_config_validation():
  with pytest.raises(ConfigError, match=r"data.task='clm' is invalid: allowed values"):
    DataConfig.from_dict({'task': 'clm'})
  with pytest.raises(ConfigError, match=r"data.packing='concat' is invalid: task "
                                        r"'classification' allows \['none'\]"):
    DataConfig.from_dict({'task': 'classification', 'packing': 'concat'})
  with pytest.raises(ConfigError, match='unknown field'):
    DataConfig.from_dict({'seqlen': 3})
  with pytest.raises(ConfigError, match='data.mlm_probability'):
    DataConfig.from_dict({'mlm_probability': 1.5})
  cfg = DataConfig.from_dict({'name': 'listops', 'builder_config': {'num_train': 5}})
  assert dataclasses.replace(cfg).builder_config['num_train'] == 5
  assert DataConfig(task='seq2seq').resolved_packing == 'first_fit'


def test_a_state_saved_while_the_packer_holds_no_remainder_restores_exactly(make_cfg, splits):
  """grain's concat packer tells 'no remainder' by comparing with the tuple (-1, -1), which the
  JSON round trip of the state turns into a list: such a state once restored one example too
  far (here: after the first row, a whole document cut at the row's end)."""
  cfg = make_cfg(name='synthetic_seq2seq/copy', task='lm', seq_len=32, builder_config=splits)
  it = make_pipeline(cfg, 'train', batch_size=1, seed=0)
  next(it)
  state = it.get_state()
  assert json.loads(state)['grain']['remainder_slices']['inputs'] == [-1, -1]
  expected = [next(it) for _ in range(3)]
  it.close()
  fresh = make_pipeline(cfg, 'train', batch_size=1, seed=0)
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)['inputs'], want['inputs'])
  fresh.close()
