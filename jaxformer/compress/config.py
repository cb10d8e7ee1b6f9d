"""The `compress` config section: compression that happens while training.

  qat      quantization-aware training (fake quantization, straight-through estimator)
  prune    magnitude / SNIP pruning, one-shot or gradual
  distill  knowledge distillation from a teacher run

Post-training quantization and structured pruning are commands on a finished run
(`python -m jaxformer.compress`), not config.
"""

from __future__ import annotations

import dataclasses

from jaxformer.config import check_choice, fail


# -------------------------------------------------------------------- quantization
GRANULARITIES = ('tensor', 'channel', 'group')
CALIBRATIONS = ('minmax', 'percentile')


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  """How weights are quantized (jaxformer/compress/quant.py; docs/compression.md).

  bits         8 or 4 (integer codes)
  granularity  'tensor': one scale per matrix (per stacked layer / expert slice);
               'channel': one per output channel (and slice);
               'group': one per output channel and group of `group_size` inputs
  symmetric    codes in [-2^(b-1), 2^(b-1) - 1] around 0 (absmax); False: a zero point (min/max)
  calibration  'minmax': the range covers every value; 'percentile': it covers the
               `percentile`-th percentile of |w| (symmetric) or the (100 - p, p) percentiles,
               and values outside are clipped to it
  embeddings   also quantize embedding tables (one scale per row: per token for the table,
               per output channel when it is tied to the output projection)
  """
  bits: int = 8
  granularity: str = 'channel'
  group_size: int = 128
  symmetric: bool = True
  calibration: str = 'minmax'
  percentile: float = 99.9
  embeddings: bool = False

  def validate(self, prefix: str) -> None:
    """Raises ConfigError naming `prefix` + the field ('compress.qat.' or '--' for flags)."""
    check_choice(f'{prefix}bits', self.bits, (4, 8))
    check_choice(f'{prefix}granularity', self.granularity, GRANULARITIES)
    check_choice(f'{prefix}calibration', self.calibration, CALIBRATIONS)
    if self.granularity == 'group' and self.group_size < 1:
      fail(f'{prefix}group_size', self.group_size, 'a group holds at least one input')
    if self.calibration == 'percentile' and not 0 < self.percentile <= 100:
      fail(f'{prefix}percentile', self.percentile, 'a percentile lies in (0, 100]')


# -------------------------------------------------------------------- quantization-aware training
@dataclasses.dataclass(frozen=True)
class QatConfig(QuantScheme):
  """Quantization-aware training (fake quantization, straight-through estimator) with the
  scheme of the fields above; `bits` = 0: off."""
  bits: int = 0

  @property
  def enabled(self) -> bool:
    return self.bits != 0

  def validate(self) -> None:
    if self.enabled:
      super().validate('compress.qat.')

  def scheme(self) -> QuantScheme:
    return QuantScheme(**{f.name: getattr(self, f.name)
                          for f in dataclasses.fields(QuantScheme)})


# -------------------------------------------------------------------- pruning
PRUNE_METHODS = ('none', 'magnitude', 'snip')
PRUNE_SCOPES = ('global', 'layer')
PRUNE_SCHEDULES = ('one_shot', 'gradual')


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Unstructured pruning while training (jaxformer/compress/prune.py); `method` 'none': off.

  method      'magnitude' (smallest |w| go) or 'snip' (Lee et al. 2019: smallest |g * w| go,
              g the loss gradient on the batch of step `start`, at initialisation when
              `start` = 0)
  sparsity    the final fraction s_f of the eligible weights set to zero, in [0, 1)
  scope       'global' (one ranking over every eligible matrix) or 'layer' (each matrix, and
              each layer slice of a stacked one, loses the same fraction)
  schedule    'one_shot' (prune once, at step `start`) or 'gradual' (Zhu & Gupta 2017:
              s_t = s_f + (s_i - s_f)(1 - (t - start) / (end - start))^3 at t = start,
              start + every, ..., end); 'snip' is one-shot only
  initial_sparsity  s_i of the gradual schedule
  embeddings  also prune the embedding tables (token / position tables, the tied output
              matrix); norms and biases are never pruned
  """
  method: str = 'none'
  sparsity: float = 0.5
  scope: str = 'global'
  schedule: str = 'one_shot'
  start: int = 0
  end: int = 0
  every: int = 1
  initial_sparsity: float = 0.0
  embeddings: bool = False

  @property
  def enabled(self) -> bool:
    return self.method != 'none'

  def validate(self) -> None:
    check_choice('compress.prune.method', self.method, PRUNE_METHODS)
    if not self.enabled:
      return
    check_choice('compress.prune.scope', self.scope, PRUNE_SCOPES)
    check_choice('compress.prune.schedule', self.schedule, PRUNE_SCHEDULES)
    for name in ('sparsity', 'initial_sparsity'):
      if not 0.0 <= getattr(self, name) < 1.0:
        fail(f'compress.prune.{name}', getattr(self, name),
             'the fraction of weights pruned must be in [0, 1)')
    if self.start < 0:
      fail('compress.prune.start', self.start, 'must be >= 0')
    if self.schedule == 'one_shot':
      return
    if self.method == 'snip':
      fail('compress.prune.schedule', self.schedule,
           "SNIP prunes once, from the gradient at one step: use schedule='one_shot'")
    if self.every <= 0:
      fail('compress.prune.every', self.every, 'must be a positive integer')
    if self.end <= self.start or (self.end - self.start) % self.every:
      fail('compress.prune.end', self.end,
           f'the gradual schedule needs end > start={self.start} with end - start a multiple '
           f'of every={self.every}')
    if self.initial_sparsity > self.sparsity:
      fail('compress.prune.initial_sparsity', self.initial_sparsity,
           f'must be at most compress.prune.sparsity={self.sparsity} (sparsity only grows)')


# -------------------------------------------------------------------- distillation
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (Hinton et al. 2015; jaxformer/compress/distill.py); `teacher` '':
  off. loss = alpha T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, labels).

  teacher      a jaxformer run folder (its config.json and newest checkpoint) with the same
               vocabulary and task; its architecture may differ
  temperature  T > 0
  alpha        the weight of the soft targets, in [0, 1]
  """
  teacher: str = ''
  temperature: float = 1.0
  alpha: float = 0.5

  @property
  def enabled(self) -> bool:
    return bool(self.teacher)

  def validate(self) -> None:
    if not self.enabled:
      return
    if not self.temperature > 0:
      fail('compress.distill.temperature', self.temperature, 'must be > 0')
    if not 0.0 <= self.alpha <= 1.0:
      fail('compress.distill.alpha', self.alpha, 'must be in [0, 1]')


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  qat: QatConfig = QatConfig()
  prune: PruneConfig = PruneConfig()
  distill: DistillConfig = DistillConfig()

  def validate(self) -> None:
    self.qat.validate()
    self.prune.validate()
    self.distill.validate()

  def check(self, exp) -> None:
    """Checks against the rest of the experiment (`Experiment.validate`)."""
    if self.prune.enabled and exp.finetune.method != 'full':
      fail('compress.prune.method', self.prune.method,
           f"needs finetune.method='full' (got {exp.finetune.method!r}): the masks cover the "
           'parameters the optimizer trains')
    if self.distill.enabled:
      from jaxformer.compress import distill  # pylint: disable=import-outside-toplevel
      distill.check(exp)
