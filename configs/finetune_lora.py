"""LoRA fine-tuning of an imported Hugging Face decoder on the Python standard library (K).

    python -m jaxformer.finetune.make_hf --family=llama --size=small --out=runs/hf_llama
    python -m jaxformer.train --config=configs/finetune_lora.py:init_from=runs/hf_llama \\
        --workdir=runs/finetune_lora
    python -m jaxformer.finetune.export --workdir=runs/finetune_lora --out=runs/ft_lora_hf \\
        --format=hf   # the adapters merged into the base weights

The imported weights stay frozen (rebuilt from `finetune.init_from` at every start, not in the
optimizer or the checkpoint); rank-8 adapters (alpha 16, dropout 0.05 on their input) on the
query and value projections train (`finetune.lora.rank / alpha / dropout / targets`). Options as in configs/finetune_full.py
(`:init_from=PATH`, `size=tiny|small`, `family=gpt2|llama`, here LLaMA by default).
Hardware: a laptop CPU, a few minutes for `small`. Result: the held-out loss falls while only
the adapter parameters change.
"""

from jaxformer.finetune.recipes import OPTIONS, finetune_config

SIZES = OPTIONS['size'][1]

__all__ = ['SIZES', 'get_config']  # SIZES: the presets the config tests read


def get_config(arg: str | None = None):
  return finetune_config(arg, method='lora', lr=3e-3, default_family='llama',
                         lora=dict(dropout=0.05))
