"""TFDS builders for the offline corpora; they write ArrayRecord files without TensorFlow.

TFDS 4.9 runs `GeneratorBasedBuilder.download_and_prepare` without TensorFlow when the file
format is ArrayRecord: examples are encoded by `tfds.features` (numpy only) and written with
`array_record`; reading back uses `builder.as_data_source(split)` (random access, what Grain
wants). `DatasetInfo` is built directly rather than through `dataset_info_from_configs`, which
would look for metadata files beside this module.

Builders (registered with TFDS on import, so `tfds.data_source('listops', ...)` also works):
- `python_stdlib`: the running interpreter's standard-library source (`*.py` under
  `sysconfig.get_paths()['stdlib']`, skipping the directories in `StdlibConfig.exclude_dirs`:
  site-packages, dist-packages and the test suites). A file's split is fixed by the SHA-256 of
  its relative POSIX path (buckets 0-89 train, 90-94 validation, 95-99 test), so machines with
  the same Python build get the same splits (distributions that strip or add stdlib modules
  change the file set, not the rule; the version is kept in the dataset metadata). Features:
  `text` (the file's bytes), `path`. Configs: `full` (default; CPython 3.11: 734 files, 12 MB,
  built in about a second) and `small` (120 files of at most 16 KB, for tests).
- `synthetic_seq2seq`: copy, reverse, sort, addition (`jaxformer.data.synthetic`); features
  `inputs`, `targets`.
- `mqar`: multi-query associative recall; features `inputs`, `targets`, `answer_mask`.
- `listops`: LRA ListOps (`jaxformer.data.listops`): features `text`, `label`; the default
  config `lra` is the LRA setting (96k/2k/2k examples, depth 10, args 10, lengths 500-2000).
- `synthetic_images`: 10 classes of procedurally drawn shapes and textures (`draw_image`),
  an offline stand-in for CIFAR-10 (whose preparation needs TensorFlow); features `image`
  (uint8 [32, 32, 3], a plain Tensor: tfds.features.Image would need TensorFlow to encode) and
  `label`; 20k/1k/1k examples.

Synthetic splits are disjoint: splits are generated in the order test, validation, train, each
from its own seed, rejecting anything an earlier split holds (earlier splits are regenerated to
know that, which is cheap since they are small).

A builder config's name carries a digest of any option overrides (`configure`), and VERSION is
bumped whenever a generator changes, so changed data never reuses an old directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import pathlib
import random
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from jaxformer.config import ConfigError
from jaxformer.data import listops
from jaxformer.data import synthetic

SPLIT_ORDER = ('test', 'validation', 'train')


def _digest(text: str | bytes) -> bytes:
  return hashlib.sha1(text.encode() if isinstance(text, str) else text).digest()


def _split_seed(seed: int, split: str) -> int:
  return int.from_bytes(_digest(f'{seed}/{split}')[:8], 'little')


def _info(builder, features: dict, description: str, **metadata) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(metadata) if metadata else None)


def _disjoint_splits(sizes: Mapping[str, int], seed: int, draw) -> dict[str, Iterator]:
  """Per-split generators of distinct examples; no example appears in two splits."""

  def draws(split, seen):
    rng = random.Random(_split_seed(seed, split))
    return synthetic.distinct(draw, rng, sizes[split], seen)

  def examples(split):
    seen: set[bytes] = set()
    for earlier in SPLIT_ORDER[:SPLIT_ORDER.index(split)]:
      for _ in draws(earlier, seen):
        pass
    yield from draws(split, seen)

  return {split: examples(split) for split in SPLIT_ORDER}


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Base of the offline builders (abstract, so TFDS does not register it)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources`, a backport that Python 3.9+ installs lack;
    # the module file is all it needs (the checksums path, unused offline).
    return epath.Path(inspect.getfile(cls))


# ----------------------------------------------------------------------------- python_stdlib
@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
  max_files: int | None = None
  max_file_bytes: int | None = None
  exclude_dirs: tuple[str, ...] = ('site-packages', 'dist-packages', '__pycache__', 'test',
                                   'tests', 'idle_test')


def stdlib_split(relative_path: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], 'big') % 100
  return 'train' if bucket < 90 else 'validation' if bucket < 95 else 'test'


def stdlib_files(config: StdlibConfig) -> list[tuple[str, pathlib.Path]]:
  """(relative POSIX path, path) of the corpus files, in a fixed order."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = []
  for path in root.rglob('*.py'):
    rel = path.relative_to(root)
    if any(part in config.exclude_dirs for part in rel.parts[:-1]) or not path.is_file():
      continue
    if config.max_file_bytes is not None and path.stat().st_size > config.max_file_bytes:
      continue
    files.append((rel.as_posix(), path))
  # A hash order makes a max_files subset an unbiased sample of the directory tree.
  files.sort(key=lambda f: hashlib.sha256(f[0].encode()).digest())
  if config.max_files is not None:
    files = files[:config.max_files]
  return files


class PythonStdlib(_Builder):
  """The running Python's standard-library source code as a language-modelling corpus."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      StdlibConfig(name='full', description='every stdlib *.py outside the excluded dirs'),
      StdlibConfig(name='small', max_files=120, max_file_bytes=16_000,
                   description='120 files of at most 16 KB, for tests'),
  ]

  def _info(self):
    return _info(self, {'text': tfds.features.Text(), 'path': tfds.features.Text()},
                 'Python standard-library source files (whole-file text).',
                 python_version=sys.version.split()[0])

  def _split_generators(self, dl_manager):
    del dl_manager
    by_split = {'train': [], 'validation': [], 'test': []}
    for rel, path in stdlib_files(self.builder_config):
      by_split[stdlib_split(rel)].append((rel, path))
    return {split: self._generate_examples(files) for split, files in by_split.items()}

  def _generate_examples(self, files):
    for rel, path in files:
      yield rel, {'text': path.read_bytes(), 'path': rel}


# ----------------------------------------------------------------------------- synthetic
@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  task: str = 'copy'
  alphabet: str = synthetic.LETTERS
  min_length: int = 1
  max_length: int = 32
  max_digits: int = 10
  num_train: int = 50_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0


class SyntheticSeq2seq(_Builder):
  """copy / reverse / sort / addition as (inputs, targets) text pairs."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [SyntheticConfig(name=t, task=t) for t in synthetic.SEQ2SEQ_TASKS]

  def _info(self):
    return _info(self, {'inputs': tfds.features.Text(), 'targets': tfds.features.Text()},
                 'Synthetic seq2seq tasks with exact answers.')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    draw = lambda rng: synthetic.make_pair(
        c.task, rng, alphabet=c.alphabet, min_length=c.min_length, max_length=c.max_length,
        max_digits=c.max_digits)
    sizes = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {split: self._generate_examples(gen)
            for split, gen in _disjoint_splits(sizes, c.seed, draw).items()}

  def _generate_examples(self, gen):
    for i, (inputs, targets) in enumerate(gen):
      yield i, {'inputs': inputs, 'targets': targets}


@dataclasses.dataclass
class MQARConfig(tfds.core.BuilderConfig):
  num_kv_pairs: int = 8
  num_queries: int | None = None
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0


class Mqar(_Builder):
  """Multi-query associative recall as text, with a mask over the answer characters."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [MQARConfig(name='kv8')]

  def _info(self):
    return _info(self, {
        'inputs': tfds.features.Text(), 'targets': tfds.features.Text(),
        'answer_mask': tfds.features.Tensor(shape=(None,), dtype=np.int32)},
                 'Multi-query associative recall (Zoology).')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    draw = lambda rng: synthetic.make_mqar(
        rng, num_kv_pairs=c.num_kv_pairs, num_queries=c.num_queries)
    sizes = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {split: self._generate_examples(gen)
            for split, gen in _disjoint_splits(sizes, c.seed, draw).items()}

  def _generate_examples(self, gen):
    for i, (inputs, targets, mask) in enumerate(gen):
      yield i, {'inputs': inputs, 'targets': targets,
                'answer_mask': np.asarray(mask, np.int32)}


# ----------------------------------------------------------------------------- listops
@dataclasses.dataclass
class ListOpsConfig(tfds.core.BuilderConfig):
  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000
  num_train: int = 96_000
  num_validation: int = 2_000
  num_test: int = 2_000
  seed: int = 0


class Listops(_Builder):
  """ListOps with the LRA generator rules, reproducible from a seed."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ListOpsConfig(name='lra', description='the Long Range Arena setting')]

  def _info(self):
    return _info(self, {'text': tfds.features.Text(),
                        'label': tfds.features.ClassLabel(num_classes=10)},
                 'ListOps (LRA rules): label = value of the expression.')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config

    def draw(rng):
      while True:
        tree, length = listops.generate_tree(rng, 1, c.max_depth, c.max_args)
        if c.min_length < length < c.max_length:
          return listops.to_string(tree), listops.tree_value(tree)

    sizes = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {split: self._generate_examples(gen)
            for split, gen in _disjoint_splits(sizes, c.seed, draw).items()}

  def _generate_examples(self, gen):
    for i, (text, label) in enumerate(gen):
      yield i, {'text': text, 'label': label}


# ----------------------------------------------------------------------------- images
@dataclasses.dataclass
class ImagesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0


IMAGE_CLASSES = ('hbar', 'vbar', 'diag', 'antidiag', 'square', 'cross', 'checker', 'dot',
                 'hstripes', 'vstripes')


def draw_image(rng: random.Random, size: int) -> tuple[np.ndarray, int]:
  """One noisy RGB image [size, size, 3] uint8 of a random class of IMAGE_CLASSES.

  Each class is a shape or texture at a random place, scale and colour on a random
  background, with pixel noise, so the label depends on spatial structure, not on colour.
  """
  label = rng.randrange(len(IMAGE_CLASSES))
  kind = IMAGE_CLASSES[label]
  yy, xx = np.mgrid[:size, :size]
  cy, cx = rng.randrange(size // 4, 3 * size // 4), rng.randrange(size // 4, 3 * size // 4)
  r = rng.randrange(size // 8, size // 4)
  w = max(1, size // 16)
  shapes = {
      'hbar': (abs(yy - cy) <= w) & (abs(xx - cx) <= r),
      'vbar': (abs(xx - cx) <= w) & (abs(yy - cy) <= r),
      'diag': (abs((yy - cy) - (xx - cx)) <= w) & (abs(xx - cx) <= r),
      'antidiag': (abs((yy - cy) + (xx - cx)) <= w) & (abs(xx - cx) <= r),
      'square': (np.maximum(abs(yy - cy), abs(xx - cx)) <= r)
                & (np.maximum(abs(yy - cy), abs(xx - cx)) > r - w - 1),
      'cross': ((abs(yy - cy) <= w) | (abs(xx - cx) <= w)) & (abs(yy - cy) <= r)
               & (abs(xx - cx) <= r),
      'checker': ((yy // (w + 2) + xx // (w + 2)) % 2 == 0) & (abs(yy - cy) <= r)
                 & (abs(xx - cx) <= r),
      'dot': (yy - cy) ** 2 + (xx - cx) ** 2 <= (r // 2 + 1) ** 2,
      'hstripes': (yy // (w + 1)) % 2 == 0,
      'vstripes': (xx // (w + 1)) % 2 == 0,
  }
  nrng = np.random.default_rng(rng.randrange(2 ** 32))
  bg, fg = nrng.uniform(0, 255, 3), nrng.uniform(0, 255, 3)
  while np.abs(bg - fg).max() < 80:
    fg = nrng.uniform(0, 255, 3)
  img = np.where(shapes[kind][..., None], fg, bg) + nrng.normal(0, 12, (size, size, 3))
  return np.clip(img, 0, 255).astype(np.uint8), label


class SyntheticImages(_Builder):
  """Ten classes of procedurally drawn shapes and textures: an offline image classification
  task for ViT (CIFAR-10 needs TensorFlow to prepare)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ImagesConfig(name='shapes32', description='32x32 RGB, 10 classes')]

  def _info(self):
    s = self.builder_config.image_size
    # A plain uint8 tensor, not tfds.features.Image: encoding images needs TensorFlow.
    return _info(self, {'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
                        'label': tfds.features.ClassLabel(names=list(IMAGE_CLASSES))},
                 'Procedural shapes and textures, 10 classes.')

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config

    def draw(rng):
      image, label = draw_image(rng, c.image_size)
      # `_disjoint_splits` keys examples by their first field, a string: the pixels' digest.
      return hashlib.sha1(image.tobytes()).hexdigest(), image, label

    sizes = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {split: self._generate_examples(gen)
            for split, gen in _disjoint_splits(sizes, c.seed, draw).items()}

  def _generate_examples(self, gen):
    for i, (_, image, label) in enumerate(gen):
      yield i, {'image': image, 'label': label}


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'synthetic_images': SyntheticImages,
    'python_stdlib': PythonStdlib,
    'synthetic_seq2seq': SyntheticSeq2seq,
    'mqar': Mqar,
    'listops': Listops,
}


def configure(name: str, overrides: Mapping[str, Any] | None = None
              ) -> tuple[type[tfds.core.GeneratorBasedBuilder], tfds.core.BuilderConfig]:
  """Resolves 'builder[/config]' plus option overrides to (builder class, config).

  Overrides make a new config named '<config>_<digest of the overrides>', so each distinct
  setting gets its own directory under the data dir.
  """
  builder_name, _, config_name = name.partition('/')
  cls = BUILDERS[builder_name]
  configs = cls.builder_configs
  config_name = config_name or cls.BUILDER_CONFIGS[0].name
  if config_name not in configs:
    raise ConfigError(f'data.name={name!r} is invalid: {builder_name} has the configs '
                      f'{sorted(configs)}')
  config = configs[config_name]
  if not overrides:
    return cls, config
  own = {f.name for f in dataclasses.fields(config)} - {
      f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = sorted(set(overrides) - own)
  if unknown:
    raise ConfigError(f'data.builder_config: unknown option(s) {unknown} for {name}; allowed '
                      f'options are {sorted(own)}')
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  tag = _digest(json.dumps(overrides, sort_keys=True, default=str)).hex()[:10]
  return cls, dataclasses.replace(config, name=f'{config.name}_{tag}', **overrides)
