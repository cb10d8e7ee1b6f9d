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
@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Pruning while training; `method` = 'none': off."""
  method: str = 'none'

  def validate(self) -> None:
    pass


# -------------------------------------------------------------------- distillation
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation; `teacher` = '': off."""
  teacher: str = ''

  def validate(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  qat: QatConfig = QatConfig()
  prune: PruneConfig = PruneConfig()
  distill: DistillConfig = DistillConfig()

  def validate(self) -> None:
    self.qat.validate()
    self.prune.validate()
    self.distill.validate()
