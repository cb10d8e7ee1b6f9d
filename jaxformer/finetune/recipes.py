"""The config the shipped fine-tuning files share (configs/finetune_full.py, finetune_lora.py):
an imported decoder, its model section read from the checkpoint, on python_stdlib bytes."""

from __future__ import annotations

import os

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.finetune.init_from import model_section
from jaxformer.finetune.make_hf import local_checkpoint
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

OPTIONS = {'init_from': ('', None), 'size': ('small', ('tiny', 'small')),
           'family': ('gpt2', ('gpt2', 'llama'))}


def finetune_config(arg: str | None, *, method: str, lr: float, default_family: str,
                    lora: dict | None = None) -> ml_collections.ConfigDict:
  """The config both finetune_*.py files share: an imported decoder on python_stdlib bytes."""
  opts = parse_config_arg(arg, dict(OPTIONS, family=(default_family, OPTIONS['family'][1])))
  tiny = opts['size'] == 'tiny'
  init_from = os.path.abspath(opts['init_from'] or local_checkpoint(opts['family'], opts['size']))
  model = model_section(init_from, field='config argument init_from')
  seq_len = 32 if tiny else 256
  steps = 2 if tiny else 600
  config = default_config(
      model=model, data=stdlib_bytes('lm', seq_len=seq_len),
      optim=warmup_adamw(lr=lr, steps=steps, b2=0.99, weight_decay=0.0),
      train=cadence(batch=8, steps=steps, evals=4, eval_batches=1 if tiny else 16,
                    test_batches=1 if tiny else 16, sample_prompt='def ', sample_tokens=0),
      finetune=dict(init_from=init_from, method=method,
                    lora=dict(rank=8, alpha=16.0, targets=('q', 'v'), **(lora or {}))))
  return config
