"""Swin Transformer (Liu et al. 2021) trained from scratch for image classification.

    python -m jaxformer.train --config=configs/swin.py --workdir=runs/swin
    python -m jaxformer.train --config=configs/swin.py:size=tiny --workdir=runs/swin_tiny

Patches are embedded and normalised, then stages of blocks attend within w x w windows of
patches (every second block with the windows shifted by w / 2, keeping the wrapped regions
apart), with a learned relative position bias per window offset; patch merging halves the map
and doubles the width between stages; the final patches are average-pooled and classified.
See docs/models.md#swin.
Data: the offline `synthetic_images` set (32x32 RGB, 10 classes; see configs/vit.py), or
CIFAR-10 online with the same overrides as configs/vit.py.
Presets (`:size=`):
  tiny    patch 4 (8 x 8 map), C = 32, one stage of 2 blocks (plain and shifted 4 x 4
          windows), 2 heads; a CPU in seconds (tests/test_configs.py).
  small   patch 2 (16 x 16 map), C = 48, depths 2-2-2, heads 3-6-12, 4 x 4 windows (the last
          stage's 4 x 4 map is one unshifted window), 2000 steps of 64 images; 2-core CPU.
          The full 2000 steps are not yet measured; a 300-step run of it
          (`--config.train.steps=300`, seed 0) reached 85.3% validation and 86.0% test
          accuracy (chance: 10%) in 14 minutes on the shared, heavily loaded 2-core CPU.
  swin_t  Swin-T's shape (C = 96, depths 2-2-6-2, heads 3-6-12-24, MLP ratio 4, drop path
          0.2) on 2 x 2 patches of the 32 x 32 images with 4 x 4 windows (map 16, 8, 4, 2);
          one GPU. Not yet measured. At 224 x 224 with 4 x 4 patches and 7 x 7 windows this is
          Swin-T itself (28.29M parameters with 1000 classes, as published; tests/test_configs.py).
Optimizer: Swin's AdamW (betas 0.9, 0.999), weight decay 0.05, clip 1.0 (the paper uses 5.0),
warmup then cosine decay, label smoothing 0.1 (the paper's ImageNet-1K recipe, which follows
DeiT); peak lr 1e-3 for the small models.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {
    'tiny': dict(d=32, depths=(2,), heads=2, patch=4, window=4, batch=8, steps=2, lr=1e-3,
                 drop_path=0.0),
    'small': dict(d=48, depths=(2, 2, 2), heads=3, patch=2, window=4, batch=64, steps=2000,
                  lr=1e-3, drop_path=0.0),
    'swin_t': dict(d=96, depths=(2, 2, 6, 2), heads=3, patch=2, window=4, batch=512,
                   steps=20_000, lr=1e-3, drop_path=0.2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'swin', d_model=s['d'], attention=dict(num_heads=s['heads']), image_size=32,
      patch_size=s['patch'], num_labels=10, drop_path=s['drop_path'],
      swin=dict(depths=s['depths'], window_size=s['window']))
  data = dict(name='synthetic_images', task='classification', seq_len=1)
  optim = dict(optimizer='adamw', lr=s['lr'], weight_decay=0.05, schedule='warmup_cosine',
               warmup_steps=max(1, s['steps'] // 20), grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 50),
               eval_every=max(2, s['steps'] // 5), eval_batches=16,
               checkpoint_every=max(2, s['steps'] // 5), test_batches=16, label_smoothing=0.1)
  return default_config(model=model, data=data, optim=optim, train=train)
