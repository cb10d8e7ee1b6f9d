"""Conformer (Gulati et al. 2020): macaron half-step FFNs, self-attention with relative (RoPE)
positions and a convolution module in every block (`jaxformer.models.conformer`).

    python -m jaxformer.train --config=configs/conformer.py --workdir=runs/conformer
    python -m jaxformer.train --config=configs/conformer.py:size=tiny --workdir=runs/conformer_t
    python -m jaxformer.train --config=configs/conformer.py:task=listops --workdir=runs/conf_lo

Options (`:key=value,...`):
  task  mqar (default)  `conformer_lm`, the causal family (causal attention and causal
                        convolution), on the offline `mqar` set (multi-query associative recall,
                        Arora et al. 2023) as a language model whose loss counts only the
                        answers; whole examples are packed into rows (`first_fit`), so the
                        convolution's segment masking is used.
        listops         `conformer`, the encoder, classifying LRA ListOps expressions of 10-62
                        tokens (jaxformer.data.listops, 10 classes) from its [BOS] state.
  size  small (default) d=64, 2 blocks, 4 heads, FFN 256, kernel 15, 1500 steps of 32 rows;
                        the 2-core reference CPU in minutes.
        tiny            d=32, 1 block, kernel 7; a CPU in seconds (tests/test_configs.py).
Model: pre-LN blocks (LayerNorm; the conv module's norm is LayerNorm, BatchNorm being refused:
see docs/models.md), swish FFNs of 4d, RoPE in place of the paper's Transformer-XL relative
encoding, no dropout. Optimizer: AdamW (0.9, 0.98), lr 1e-3, warmup then cosine, clip 1.0.
MQAR: 4 key-value pairs and 4 queries per example (`small`: 8 and 8), byte tokens.
Measured (small, mqar, 1500 steps, once): 37.8% validation / 39.2% test answer accuracy (chance
3.3%); tests/models/test_learning.py (slow) requires > 30%. See docs/results.md,
"Conformer".
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

OPTIONS = {'size': ('small', 'tiny'), 'task': ('mqar', 'listops')}
SIZES = {
    'small': dict(d=64, layers=2, heads=4, ffn=256, kernel=15, kv=8, seq=72, batch=32,
                  steps=1500, warmup=100),
    'tiny': dict(d=32, layers=1, heads=2, ffn=64, kernel=7, kv=4, seq=64, batch=8, steps=2,
                 warmup=1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {k: (v[0], v) for k, v in OPTIONS.items()})
  s = SIZES[opts['size']]
  lm = opts['task'] == 'mqar'
  seq = s['seq'] if lm else 64
  model = family_dict(
      'conformer_lm' if lm else 'conformer', d_model=s['d'], num_layers=s['layers'],
      max_length=seq, attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=s['ffn']),
      conformer=dict(kernel_size=s['kernel']),
      **(dict(vocab_size=260) if lm else dict(vocab_size=20, num_labels=10, pad_id=0)))
  if lm:
    data = dict(name='mqar', task='lm', tokenizer='byte', extra_ids=0, seq_len=seq,
                packing='first_fit',
                builder_config=dict(num_kv_pairs=s['kv'], num_train=20000,
                                    num_validation=512, num_test=512))
  else:
    data = dict(name='listops', task='classification', tokenizer='listops', extra_ids=0,
                seq_len=seq, builder_config=dict(min_length=10, max_length=62,
                                                 num_train=20000, num_validation=512,
                                                 num_test=512))
  optim = dict(optimizer='adamw', lr=1e-3, b2=0.98, schedule='warmup_cosine',
               warmup_steps=s['warmup'], end_lr_ratio=0.05, grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 30),
               eval_every=max(2, s['steps'] // 3), eval_batches=16,
               checkpoint_every=max(2, s['steps'] // 3), test_batches=16)
  return default_config(model=model, data=data, optim=optim, train=train)
