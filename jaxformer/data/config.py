"""`DataConfig`: the validated `config.data` section (what to read and how to batch it).

`name` is a TFDS name, optionally with a config: the offline builders ('python_stdlib',
'python_stdlib/small', 'synthetic_seq2seq/copy', 'mqar', 'listops') or any TFDS dataset
('tiny_shakespeare', 'lm1b', 'c4/en', 'wmt14/de-en', 'glue/sst2', 'imdb_reviews', 'cifar10').
`builder_config` overrides options of an offline builder's config (e.g. {'num_train': 2000,
'max_length': 16}); the overridden config gets its own directory.
`features` maps the pipeline's canonical features (text, inputs, targets, label, image,
answer_mask) to the dataset's; `jaxformer.data.sources.DEFAULT_FEATURES` covers the datasets
above. A comma-separated value joins several text features with EOS (GLUE sentence pairs).
`packing='auto'` is 'concat' for lm, mlm, rtd, span_corruption and denoise (documents are joined
and cut into rows), 'first_fit' for seq2seq, and 'none' (one example per row) for
classification.
`target_len` is the decoder length for seq2seq and denoise (None: seq_len); span corruption
derives it from seq_len as T5 does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

from jaxformer.config import ConfigError, _build, _to_plain, check_choice, fail

TASKS = ('lm', 'mlm', 'span_corruption', 'denoise', 'seq2seq', 'classification', 'rtd')
TOKENIZERS = ('byte', 'spm', 'listops')
PACKINGS = ('auto', 'none', 'first_fit', 'concat')
SPM_MODEL_TYPES = ('unigram', 'bpe')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to turn it into batches (see the module docstring)."""
  name: str = 'python_stdlib'
  task: str = 'lm'
  tokenizer: str = 'byte'
  seq_len: int = 512
  target_len: int | None = None
  packing: str = 'auto'
  train_split: str = 'train'
  eval_split: str = 'validation'
  data_dir: str | None = None
  builder_config: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  features: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  download: bool = True
  # tokenizer
  extra_ids: int = 100
  spm_vocab_size: int = 8000
  spm_model_type: str = 'unigram'
  # objectives
  mlm_probability: float = 0.15
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  bart_mask_ratio: float = 0.3
  bart_poisson_lambda: float = 3.0
  bart_permute_sentences: bool = False
  # input pipeline
  num_packing_bins: int = 16
  read_threads: int = 2
  prefetch: int = 2
  worker_count: int = 0
  # data shards a global batch is drawn from (jaxformer.data.shards); 0: one per process
  num_shards: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides) -> 'DataConfig':
    """Builds a validated config from a mapping such as `config.data.to_dict()`."""
    d = dict(_to_plain(d or {}), **overrides)
    cfg = _build(cls, d, 'data')
    cfg.validate()
    return cfg

  def replace(self, **changes) -> 'DataConfig':
    cfg = dataclasses.replace(self, **changes)
    cfg.validate()
    return cfg

  @property
  def resolved_packing(self) -> str:
    if self.packing != 'auto':
      return self.packing
    return {'lm': 'concat', 'mlm': 'concat', 'rtd': 'concat', 'span_corruption': 'concat',
            'denoise': 'concat',
            'seq2seq': 'first_fit'}.get(self.task, 'none')

  def validate(self) -> None:
    check_choice('data.task', self.task, TASKS)
    check_choice('data.tokenizer', self.tokenizer, TOKENIZERS)
    check_choice('data.packing', self.packing, PACKINGS)
    check_choice('data.spm_model_type', self.spm_model_type, SPM_MODEL_TYPES)
    if not self.name or self.name != self.name.strip():
      fail('data.name', self.name, "must be a dataset name such as 'python_stdlib' or 'glue/sst2'")
    for name in ('seq_len', 'num_packing_bins', 'spm_vocab_size'):
      if getattr(self, name) <= 0:
        fail(f'data.{name}', getattr(self, name), 'must be a positive integer')
    if self.target_len is not None and self.target_len <= 0:
      fail('data.target_len', self.target_len, 'must be a positive integer or None')
    for name in ('extra_ids', 'read_threads', 'prefetch', 'worker_count', 'num_shards'):
      if getattr(self, name) < 0:
        fail(f'data.{name}', getattr(self, name), 'must be >= 0')
    for name in ('mlm_probability', 'noise_density', 'bart_mask_ratio'):
      if not 0.0 < getattr(self, name) < 1.0:
        fail(f'data.{name}', getattr(self, name), 'must be in (0, 1)')
    if self.mean_noise_span_length < 1.0:
      fail('data.mean_noise_span_length', self.mean_noise_span_length, 'must be >= 1')
    if self.bart_poisson_lambda <= 0:
      fail('data.bart_poisson_lambda', self.bart_poisson_lambda, 'must be > 0')
    packing = self.resolved_packing
    allowed = {'lm': ('none', 'first_fit', 'concat'), 'mlm': ('none', 'first_fit', 'concat'),
               'rtd': ('none', 'first_fit', 'concat'),
               'seq2seq': ('none', 'first_fit'), 'classification': ('none',),
               'span_corruption': ('none', 'concat'),
               'denoise': ('none', 'concat')}[self.task]
    if packing not in allowed:
      fail('data.packing', self.packing, f'task {self.task!r} allows {list(allowed)} (or auto)')
    if self.task == 'span_corruption' and self.extra_ids == 0:
      fail('data.extra_ids', 0, 'span corruption needs sentinel ids; use e.g. 100')
    for key, value in self.features.items():
      if not isinstance(value, str):
        raise ConfigError(f'data.features.{key}={value!r} is invalid: expected a feature name')
