"""Dataset name -> random-access ArrayRecord source, preparing offline builders on first use.

Offline builders (`jaxformer.data.builders`) are generated locally the first time they are
read (seconds; ListOps at the full LRA size takes minutes) under a file lock, so concurrent
processes sharing a data dir prepare once.

Online datasets (tiny_shakespeare, lm1b, c4, wmt14, glue, imdb_reviews, cifar10, mnist, any
TFDS name) are read when they are already prepared as ArrayRecord in the data dir; otherwise
they are downloaded and prepared with `file_format='array_record'` when `data.download` is set
and the machine reaches the internet. Preparation runs TFDS's own builder code, and several
builders (tiny_shakespeare, for one) call `tf.io.gfile` there, so preparing them needs
TensorFlow even though reading does not: prepare once elsewhere with
`tfds build NAME --file_format=array_record --data_dir=DIR` and copy DIR. A dataset that cannot
be had raises `DataUnavailableError` naming it, the directory and what to do, before any
model is compiled.

The data dir is `data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping

import tensorflow_datasets as tfds

from jaxformer.config import ConfigError
from jaxformer.data import builders
from jaxformer.data.config import DataConfig


class DataUnavailableError(RuntimeError):
  """A dataset is unknown, not prepared and not downloadable, or stored in the wrong format."""


# canonical feature -> dataset feature (comma-separated: text features joined with EOS)
DEFAULT_FEATURES: dict[str, dict[str, str]] = {
    'python_stdlib': {'text': 'text'},
    'synthetic_seq2seq': {'inputs': 'inputs', 'targets': 'targets'},
    'mqar': {'inputs': 'inputs', 'targets': 'targets', 'answer_mask': 'answer_mask'},
    'listops': {'text': 'text', 'label': 'label'},
    'synthetic_images': {'image': 'image', 'label': 'label'},
    'tiny_shakespeare': {'text': 'text'},
    'lm1b': {'text': 'text'},
    'c4': {'text': 'text'},
    'imdb_reviews': {'text': 'text', 'label': 'label'},
    'glue': {'text': 'sentence', 'label': 'label'},
    'cifar10': {'image': 'image', 'label': 'label'},
    'mnist': {'image': 'image', 'label': 'label'},
}

TASK_FEATURES = {
    'lm': (('text',), ('inputs', 'targets')),
    'mlm': (('text',),),
    'rtd': (('text',),),
    'span_corruption': (('text',),),
    'denoise': (('text',),),
    'seq2seq': (('inputs', 'targets'),),
    'classification': (('text', 'label'), ('image', 'label')),
}


def data_dir(cfg: DataConfig) -> str:
  return os.path.expanduser(cfg.data_dir or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets')


def feature_map(cfg: DataConfig) -> dict[str, str]:
  """Canonical -> dataset feature names for `cfg.name` (defaults, then `cfg.features`)."""
  base, _, config = cfg.name.partition('/')
  mapping = dict(DEFAULT_FEATURES.get(base, {}))
  if base.startswith('wmt') and re.fullmatch(r'[a-z]+-[a-z]+', config):
    source, target = config.split('-')
    mapping = {'inputs': source, 'targets': target}
  mapping.update(cfg.features)
  return mapping


def task_features(cfg: DataConfig, available) -> dict[str, str]:
  """The canonical features `cfg.task` will read; raises if the dataset lacks them."""
  mapping = feature_map(cfg)
  options = TASK_FEATURES[cfg.task]
  for option in options:
    if all(c in mapping and all(f in available for f in mapping[c].split(',')) for c in option):
      chosen = {c: mapping[c] for c in option}
      if 'answer_mask' in mapping and 'inputs' in option and cfg.task == 'lm':
        chosen['answer_mask'] = mapping['answer_mask']
      return chosen
  wanted = ' or '.join('+'.join(o) for o in options)
  raise ConfigError(
      f'data.features: task {cfg.task!r} reads {wanted}, but for {cfg.name} the mapping is '
      f'{mapping or "{}"} and the dataset has the features {sorted(available)}; set '
      "data.features, e.g. {'text': '<feature name>'}")


def _online(timeout: float = 3.0) -> bool:
  try:
    socket.create_connection(('storage.googleapis.com', 443), timeout=timeout).close()
    return True
  except OSError:
    return False


@contextlib.contextmanager
def _lock(directory: str, name: str):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f'.{name.replace("/", "_")}.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet():
  """Offline builders take seconds; TFDS's progress bars would only clutter the log."""
  tqdm_utils = tfds.core.utils.tqdm_utils
  active = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(active)


def remove_incomplete(b: tfds.core.DatasetBuilder) -> list[str]:
  """Deletes what an interrupted preparation left (TFDS's `incomplete.*` folders); returns them.

  TFDS prepares into `incomplete.<id>.<version>` next to the final folder and renames it when
  done, removing it on an exception, but a killed process (SIGKILL, SIGTERM) leaves it behind.
  Called under the preparation lock, so no other process is writing one.
  """
  parent = os.path.dirname(os.fspath(b.data_dir))
  left = sorted(glob.glob(os.path.join(parent, 'incomplete.*')))
  for path in left:
    shutil.rmtree(path, ignore_errors=True)
  return left


def builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `cfg.name`; prepares or downloads it when it can."""
  directory = data_dir(cfg)
  base = cfg.name.partition('/')[0]
  if base in builders.BUILDERS:
    cls, config = builders.configure(cfg.name, cfg.builder_config)
    # A registered config goes by name: a copy of the object (e.g. unpickled in a grain
    # worker) would clash with the class's own.
    config = config.name if cls.builder_configs.get(config.name) is config else config
    b = cls(config=config, data_dir=directory, file_format='array_record')
    if not b.is_prepared():
      with _lock(directory, f'{cfg.name}_{b.builder_config.name}'), _quiet():
        b = cls(config=config, data_dir=directory, file_format='array_record')
        if not b.is_prepared():
          remove_incomplete(b)
          b.download_and_prepare(download_config=tfds.download.DownloadConfig(
              try_download_gcs=False))
    return b
  if cfg.builder_config:
    raise ConfigError(f'data.builder_config={dict(cfg.builder_config)!r} is invalid: options '
                      f'exist only for the offline builders {sorted(builders.BUILDERS)}')
  try:
    b = tfds.builder(cfg.name, data_dir=directory, file_format='array_record')
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataUnavailableError(
        f'unknown dataset {cfg.name!r}: it is neither an offline builder '
        f'({sorted(builders.BUILDERS)}) nor a TFDS dataset (names look like '
        f"'tiny_shakespeare' or 'glue/sst2').") from e
  except ValueError as e:  # e.g. an unknown config of a known dataset
    raise DataUnavailableError(f'dataset {cfg.name!r}: {e}') from e
  if b.is_prepared():
    return b
  where = (f'{cfg.name} is not prepared in {directory}')
  todo = ('prepare it once on a machine with internet (`tfds build '
          f'{cfg.name} --file_format=array_record --data_dir=DIR`, then copy DIR), or point '
          'data.data_dir / $TFDS_DATA_DIR at a directory that holds it')
  if not cfg.download:
    raise DataUnavailableError(f'{where} and data.download is False; {todo}.')
  if not _online():
    raise DataUnavailableError(f'{where} and this machine cannot download it; {todo}.')
  with _lock(directory, cfg.name):
    remove_incomplete(b)
    try:
      b.download_and_prepare()
    except ModuleNotFoundError as e:
      if 'tensorflow' not in str(e):
        raise
      raise DataUnavailableError(
          f"TFDS's builder for {cfg.name} needs TensorFlow to prepare the data (reading it "
          f'back does not); {todo}.') from e
  return b


def load(cfg: DataConfig, split: str):
  """(random-access source, features) of one split of `cfg.name`."""
  b = builder(cfg)
  base_split = re.split(r'[\[+]', split, maxsplit=1)[0]
  if base_split not in b.info.splits:
    raise ConfigError(f'split={split!r} is invalid: {cfg.name} has the splits '
                      f'{sorted(b.info.splits)}')
  try:
    source = b.as_data_source(split)
  except (NotImplementedError, ValueError) as e:
    raise DataUnavailableError(
        f'{cfg.name} in {b.data_dir} cannot be read with random access ({e}); re-prepare it '
        "with file_format='array_record'.") from e
  return source, b.info.features


def texts(source, features: Mapping[str, str], limit_chars: int = 20_000_000
          ) -> Iterator[bytes]:
  """Raw text of a source's text features, in order (the SentencePiece training corpus)."""
  names = [n for c in ('text', 'inputs', 'targets') if c in features
           for n in features[c].split(',')]
  total = 0
  for i in range(len(source)):
    example = source[i]
    for n in names:
      value = example[n]
      total += len(value)
      yield value
    if total >= limit_chars:
      return
