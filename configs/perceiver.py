"""Perceiver (Jaegle et al. 2021): a latent array cross-attends to the inputs, then a latent
Transformer whose cost does not depend on the input length (`jaxformer.models.perceiver`).

    python -m jaxformer.train --config=configs/perceiver.py --workdir=runs/perceiver
    python -m jaxformer.train --config=configs/perceiver.py:size=tiny --workdir=runs/perceiver_tiny
    python -m jaxformer.train --config=configs/perceiver.py:data=listops --workdir=runs/pl

Options (`:key=value,...`): `data` images (default) | listops; `size` small (default) | tiny.
  images   the offline `synthetic_images` set (32x32 RGB, 10 classes; see configs/vit.py), read
           as pixels (small: 1024 single pixels, the paper's input) or 4x4 patches (tiny), each
           with Fourier features of its position (16 bands).
  listops  LRA ListOps (`jaxformer.data.listops`, 10 classes): small is the LRA setting (lengths
           500-2000, 96k/2k/2k examples, generated on first use), read as token ids with
           learned positions and padding masked out of the cross-attention; tiny is a
           120-example set of short expressions.
Presets:
  small  d=128, 64 latents, 1 cross-attention head, 4 latent layers of 4 heads, FFN 512, 2
         repeats sharing weights after the first (the paper's recurrent form), 2000 steps of 64
         examples; a CPU (not timed) or one GPU in minutes.
  tiny   d=32, 8 latents, 1 latent layer, 1 repeat; a CPU in seconds (tests/test_configs.py).
Optimizer: AdamW, weight decay 0.05, clip 1.0, warmup then cosine decay, label smoothing 0.1
(the ViT config's from-scratch settings; the paper used LAMB on ImageNet).
Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence

OPTIONS = {'size': ('small', 'tiny'), 'data': ('images', 'listops')}
SIZES = {
    'tiny': dict(d=32, latents=8, layers=1, heads=2, ffn=64, repeats=1, patch=4, batch=8,
                 steps=2, lr=1e-3, listops_len=64),
    'small': dict(d=128, latents=64, layers=4, heads=4, ffn=512, repeats=2, patch=1, batch=64,
                  steps=2000, lr=1e-3, listops_len=2000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {k: (v[0], v) for k, v in OPTIONS.items()})
  s = SIZES[opts['size']]
  images = opts['data'] == 'images'
  seq = s['listops_len']
  model = family_dict(
      'perceiver', d_model=s['d'], num_layers=s['layers'], attention=dict(num_heads=s['heads']),
      ffn=dict(hidden_dim=s['ffn']), num_labels=10, vocab_size=20,
      perceiver=dict(num_latents=s['latents'], num_repeats=s['repeats'], cross_heads=1,
                     share_weights=True, inputs='pixels' if images else 'tokens',
                     fourier_bands=16),
      image_size=32, patch_size=s['patch'], num_channels=3, max_length=seq,
      position=dict(kind='learned', max_length=seq))
  if images:
    data = dict(name='synthetic_images', task='classification', seq_len=1)
  else:
    data = dict(name='listops', task='classification', tokenizer='listops', extra_ids=0,
                seq_len=seq)
    if opts['size'] == 'tiny':
      data['builder_config'] = dict(num_train=120, num_validation=40, num_test=40,
                                    min_length=20, max_length=seq)
  optim = dict(optimizer='adamw', lr=s['lr'], weight_decay=0.05, schedule='warmup_cosine',
               warmup_steps=max(1, s['steps'] // 20), grad_clip_norm=1.0)
  train = cadence(s['batch'], s['steps'], logs=50, evals=5, label_smoothing=0.1)
  return default_config(model=model, data=data, optim=optim, train=train)
