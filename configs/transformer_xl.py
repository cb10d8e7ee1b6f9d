"""Transformer-XL (Dai et al. 2019): a byte-level LM with segment recurrence and relative
positions (`jaxformer.models.transformer_xl`).

    python -m jaxformer.train --config=configs/transformer_xl.py:size=small --workdir=runs/txl
    python -m jaxformer.train --config=configs/transformer_xl.py:size=tiny --workdir=runs/txl_tiny

Each training row of `data.seq_len` bytes is cut into segments of `model.segment_length`; the
model runs them in order with a `jax.lax.scan`, every layer attending over its memory of the
previous `model.memory_length` layer inputs (no gradient) and the current segment, so the
ordinary Trainer trains it unchanged. The memory starts empty in every row (the paper carries it
across consecutive batches of one stream, which the shuffled, packed pipeline does not keep).
Data: the offline python_stdlib corpus, bytes (260 ids). The paper's post-LN became pre-LN here
(`model.norm_position`), as in most later reimplementations; ReLU FFN, tied embeddings.
Sampling through the Trainer (`train.sample_tokens`) uses the KV-cache decoder of the other LMs
and is off: decode with `model(next_token, memory=out.cache)` instead.
Presets (`:size=`):
  tiny   d=32, 2 layers, 2 heads, rows of 64 bytes in 4 segments of 16, memory 16; a CPU in
         seconds (tests/test_configs.py).
  small  d=256, 4 layers, 4 heads, FFN 1024, rows of 512 bytes in 4 segments of 128, memory
         128, 2000 steps of 16 rows; a CPU (not timed) or one GPU in minutes.
Optimizer: AdamW, betas (0.9, 0.95), weight decay 0.1, clip 0.25 (the paper's), warmup then
cosine decay.
Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, ffn=64, seq=64, segment=16, memory=16, batch=8,
                 steps=2, lr=3e-3),
    'small': dict(d=256, layers=4, heads=4, ffn=1024, seq=512, segment=128, memory=128,
                  batch=16, steps=2000, lr=1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'transformer_xl', vocab_size=260, d_model=s['d'], num_layers=s['layers'],
      max_length=s['seq'], attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=s['ffn']),
      segment_length=s['segment'], memory_length=s['memory'])
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.95, weight_decay=0.1, grad_clip_norm=0.25)
  train = cadence(s['batch'], s['steps'], sample_tokens=0)
  return default_config(model=model, data=data, optim=optim, train=train)
