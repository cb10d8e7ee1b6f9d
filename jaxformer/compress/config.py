"""The `compress` config section: compression that happens while training.

  qat      quantization-aware training (fake quantization, straight-through estimator)
  prune    magnitude / SNIP pruning, one-shot or gradual
  distill  knowledge distillation from a teacher run

Post-training quantization and structured pruning are commands on a finished run
(`python -m jaxformer.compress`), not config.
"""

from __future__ import annotations

import dataclasses


# -------------------------------------------------------------------- quantization-aware training
@dataclasses.dataclass(frozen=True)
class QatConfig:
  """Quantization-aware training; `bits` = 0: off."""
  bits: int = 0

  def validate(self) -> None:
    pass


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
