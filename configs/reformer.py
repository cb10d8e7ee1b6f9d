"""Reformer language model (Kitaev et al. 2020): LSH attention, reversible layers, chunked FFN.

    python -m jaxformer.train --config=configs/reformer.py:size=small --workdir=runs/reformer
    python -m jaxformer.train --config=configs/reformer.py:size=tiny --workdir=runs/reformer_tiny

The 'reformer' family (jaxformer/models/families.py): shared-QK LSH attention
(`model.attention.kind='lsh'`, options n_buckets / n_hashes / chunk_size / seed), reversible
residual layers (`model.reversible=True`: activation memory flat in depth), the FFN applied in
chunks of positions (`model.ffn.chunk_size`), pre-LN, GELU, tied head. Learned absolute
positions replace the paper's axial ones. Byte-level (260 ids) on the offline python_stdlib
corpus. Presets (`:size=`):
  tiny   d=32, 2 layers, 2 heads, 64 bytes in 4 chunks of 16 with 4 buckets; a CPU in seconds
         (tests/test_configs.py).
  small  d=256, 6 layers, 4 heads, FFN 1024 (chunks of 128 positions), 512 bytes of context
         in chunks of 64 with 8 buckets (the paper's n_buckets ~ length / chunk), 2 hash rounds;
         2000 steps of 16 x 512 bytes. Meant for a CPU (not timed; hours) or one GPU.
Optimizer: AdamW, betas (0.9, 0.98), weight decay 0.01, clip 1.0, warmup then cosine decay (the
paper used Adafactor; AdamW is this framework's default). LSH attention cannot decode with a
KV cache (the registry refuses 'decode' with its reason), so no samples are generated.
Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, ffn=64, seq=64, chunk=16, buckets=4, ffn_chunk=16,
                 batch=8, steps=2, lr=3e-3),
    'small': dict(d=256, layers=6, heads=4, ffn=1024, seq=512, chunk=64, buckets=8,
                  ffn_chunk=128, batch=16, steps=2000, lr=1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'reformer', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], options=dict(
          n_buckets=s['buckets'], n_hashes=2, chunk_size=s['chunk'], seed=0)),
      ffn=dict(hidden_dim=s['ffn'], chunk_size=s['ffn_chunk']),
      position=dict(max_length=s['seq']))
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.98, weight_decay=0.01, end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], sample_tokens=0)
  return default_config(model=model, data=data, optim=optim, train=train)
