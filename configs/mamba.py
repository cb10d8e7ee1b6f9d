"""Mamba language model (Gu & Dao 2023): selective state-space layers, optionally hybrid.

    python -m jaxformer.train --config=configs/mamba.py:size=small --workdir=runs/mamba
    python -m jaxformer.train --config=configs/mamba.py:size=small,hybrid=true --workdir=runs/jamba
    python -m jaxformer.train --config=configs/mamba.py:size=tiny --workdir=runs/mamba_tiny

The 'mamba' family (jaxformer/models/families.py, docs/models.md "Mamba"): every layer is
h = x + Mamba(RMSNorm(x)) with no FFN and no positions, tied head (HF MambaForCausalLM). With
`hybrid=true` every 2nd layer is a Transformer layer (RoPE attention + SwiGLU FFN) and the Mamba
layers carry the FFN too (`model.mamba.attention_every=2`, `model.mamba.ffn=True`: Jamba's
layout at a 1:1 ratio). Byte-level (260 ids) on the offline python_stdlib corpus; packed rows
are kept apart (the state restarts at every example). Presets (`:size=`):
  tiny   d=32, 2 layers, state 4; a CPU in seconds (tests/test_configs.py).
  small  d=256, 8 layers, state 16, 256 bytes of context, 2000 steps of 16 x 256 bytes; a CPU
         (not timed; hours) or one GPU.
  130m   d=768, 24 layers, state 16, dt rank 48 (Mamba-130M: 129,135,360 parameters with the
         GPT-NeoX vocabulary of 50280), 1024 context, remat: one GPU. The training scan holds
         [B, T, 2D, 16] float32 tensors (no fused kernel), 0.8 GB per 8 x 1024 rows and layer.
Optimizer (the paper's): AdamW, betas (0.9, 0.95), weight decay 0.1 (not on A_log, D, biases and
norms), clip 1.0, warmup then cosine decay to 10%.
Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, lm_sample, stdlib_bytes, warmup_adamw

SIZES = {
    'tiny': dict(d=32, layers=2, state=4, heads=2, seq=64, batch=8, steps=2, lr=3e-3),
    'small': dict(d=256, layers=8, state=16, heads=4, seq=256, batch=16, steps=2000, lr=1e-3),
    '130m': dict(d=768, layers=24, state=16, heads=12, seq=1024, batch=16, steps=2000, lr=6e-4),
}
OPTIONS = {'size': tuple(SIZES), 'hybrid': ('false', 'true')}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES), 'hybrid': ('false', OPTIONS['hybrid'])})
  size, s = opts['size'], SIZES[opts['size']]
  hybrid = opts['hybrid'] == 'true'
  model = family_dict(
      'mamba', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      mamba=dict(d_state=s['state'], attention_every=2 if hybrid else 0, ffn=hybrid),
      remat='full' if size == '130m' else 'none')
  if hybrid:
    model.update(attention=dict(num_heads=s['heads']), position=dict(kind='rope'),
                 ffn=dict(activation='silu', gated=True, bias=False))
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.95, weight_decay=0.1, end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], **lm_sample('tiny' if size == 'tiny' else 'small'))
  return default_config(model=model, data=data, optim=optim, train=train)
