"""Full fine-tuning of an imported Hugging Face decoder on the Python standard library (K).

    python -m jaxformer.finetune.make_hf --family=gpt2 --size=small --out=runs/hf_gpt2
    python -m jaxformer.train --config=configs/finetune_full.py:init_from=runs/hf_gpt2 \\
        --workdir=runs/finetune_full
    python -m jaxformer.finetune.export --workdir=runs/finetune_full --out=runs/ft_hf --format=hf

Every parameter of the imported model trains (finetune.method='full'); the model section is
the checkpoint's own (`jaxformer.finetune.init_from.model_section`), so no size is repeated here, and a
checkpoint that does not fit fails before anything is compiled. Without `init_from` the config
builds a random GPT-2 (or `family=llama`) of the preset's size locally on first use
(`jaxformer.finetune.make_hf.local_checkpoint`, nothing downloads). Options:
`:init_from=PATH` (an HF directory, a .safetensors file with config.json next to it, or a
jaxformer run), `size=tiny|small` (tiny: seconds, the test suite runs it for 2 steps; small:
d=128, 4 layers, 600 steps of 8 x 256 bytes, a few minutes on a 2-core CPU), `family=gpt2|llama`
(the locally built default only).
Hardware: a laptop CPU. Result: the held-out loss of the imported model falls (a randomly
built checkpoint starts near ln(260) = 5.56 nats per byte).
"""

from jaxformer.finetune.recipes import OPTIONS, finetune_config

SIZES = OPTIONS['size'][1]

__all__ = ['SIZES', 'get_config']  # SIZES: the presets the config tests read


def get_config(arg: str | None = None):
  return finetune_config(arg, method='full', lr=1e-3, default_family='gpt2')
