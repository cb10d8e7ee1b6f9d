"""The `finetune` config section: where the parameters start and which of them train.

  method       'full'     every parameter trains (the default; also training from scratch)
               'lora'     LoRA (Hu et al. 2021): W = W0 + (alpha / r) A B on the target matrices;
                          only A, B (and `train_also`) train, W0 stays frozen
               'qlora'    LoRA on a base quantized to `lora.base_bits` (Dettmers et al. 2023):
                          W0 is kept as int4/int8 group-wise codes and dequantized in the step
               'modules'  only the parameters of the modules `model.peft` adds (adapters,
                          prefixes, prompts) and `train_also` train
  init_from    '' (fresh initialisation) or a jaxformer run folder / checkpoint step folder, a
               local Hugging Face directory (config.json + *.safetensors) or a .safetensors file
  train_also   a regex over parameter paths ('.'-joined, e.g. 'final_norm|head') of base
               parameters that train too under lora / qlora / modules. Parameters the
               `init_from` source does not have (a new task head) always train.
  unfreeze     gradual unfreezing (ULMFiT, Howard & Ruder 2018) under 'full': stages
               (start_step, groups): from start_step the top `groups` groups train, the rest
               get zero gradients and updates. Groups from the top: 1 = everything outside the
               layers and embeddings (heads, final norm), 2 = also the last layer, ...,
               L + 1 = every layer, L + 2 = also the embeddings (everything). Empty: all train.
"""

from __future__ import annotations

import dataclasses
import re

from jaxformer.config import check_choice, fail

METHODS = ('full', 'lora', 'qlora', 'modules')
LORA_METHODS = ('lora', 'qlora')
BASE_BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings. `targets`: logical names ('q', 'k', 'v', 'o', 'attention' = q k v o of
  every attention, 'ffn' = every FFN matrix, 'head' = the output head) or regexes over
  parameter paths; every target must match at least one matrix. `rank` r and `alpha`: the
  update is (alpha / r) A B with A [in, r] (Kaiming-uniform) and B [r, out] (zeros), so the
  model starts equal to the base. `dropout` p: while training, inputs of the low-rank path are
  dropped (x W0 + (alpha / r)(drop(x) A) B; jaxformer/finetune/lora.py, LoRA dropout).
  QLoRA: `base_bits` (4 or 8) and `base_group_size` (the
  group-wise quantization of the frozen base along each matrix's input dimension)."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q', 'v')
  base_bits: int = 4
  base_group_size: int = 64

  def validate(self) -> None:
    if self.rank <= 0:
      fail('finetune.lora.rank', self.rank, 'must be a positive integer')
    if self.alpha <= 0:
      fail('finetune.lora.alpha', self.alpha, 'must be > 0')
    if not 0.0 <= self.dropout < 1.0:
      fail('finetune.lora.dropout', self.dropout,
           'the probability of dropping an input of the low-rank path must be in [0, 1)')
    if not self.targets:
      fail('finetune.lora.targets', self.targets, 'must name at least one target')
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        fail('finetune.lora.targets', t, f'must be a logical name or a valid regex ({e})')
    check_choice('finetune.lora.base_bits', self.base_bits, BASE_BITS)
    if self.base_group_size <= 0:
      fail('finetune.lora.base_group_size', self.base_group_size, 'must be a positive integer')


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """See the module docstring."""
  method: str = 'full'
  init_from: str = ''
  train_also: str = ''
  unfreeze: tuple[tuple[int, ...], ...] = ()
  lora: LoraConfig = LoraConfig()

  def validate(self) -> None:
    check_choice('finetune.method', self.method, METHODS)
    if self.method in LORA_METHODS:
      self.lora.validate()
    if self.train_also:
      if self.method == 'full':
        fail('finetune.train_also', self.train_also,
             "only applies to method 'lora', 'qlora' or 'modules' (under 'full' everything "
             'trains)')
      try:
        re.compile(self.train_also)
      except re.error as e:
        fail('finetune.train_also', self.train_also, f'must be a valid regex ({e})')
    if self.unfreeze:
      if self.method != 'full':
        fail('finetune.unfreeze', self.unfreeze,
             f"needs finetune.method='full' (got {self.method!r}): it schedules which of all "
             'the parameters train')
      last = -1
      for i, stage in enumerate(self.unfreeze):
        if len(stage) != 2 or stage[0] < 0 or stage[1] <= 0:
          fail(f'finetune.unfreeze[{i}]', stage,
               'must be (start_step >= 0, groups >= 1)')
        if stage[0] <= last:
          fail(f'finetune.unfreeze[{i}]', stage, 'start steps must increase')
        last = stage[0]
      if self.unfreeze[0][0] != 0:
        fail('finetune.unfreeze[0]', self.unfreeze[0],
             'must start at step 0 (which groups train from the start)')
