"""Vision Transformer (Dosovitskiy et al. 2021) trained from scratch for image classification.

    python -m jaxformer.train --config=configs/vit.py --workdir=runs/vit
    python -m jaxformer.train --config=configs/vit.py:size=tiny --workdir=runs/vit_tiny

Images are cut into p x p patches, linearly embedded, prefixed with a learned [CLS] token, given
learned positions and read by a pre-LN encoder; the head classifies the final [CLS] state.
Data: the offline `synthetic_images` set (jaxformer.data.builders: 32x32 RGB, 10 classes of
procedurally drawn bars, outlines, crosses, checkers, dots and stripes at random places, scales
and colours with pixel noise; 20000 / 1000 / 1000 disjoint train / validation / test images).
CIFAR-10 (same shape) is the online option:
`--config.data.name=cifar10 --config.data.train_split='train[:90%]' --config.data.eval_split='train[90%:]'`
(it has no validation split). Reading it needs no TensorFlow, but TFDS's cifar10 builder needs
TensorFlow to *prepare* it: run `tfds build cifar10 --file_format=array_record` on a machine with
TensorFlow and internet, then point `--config.data.data_dir` (or $TFDS_DATA_DIR) at the result.
Presets (`:size=`):
  small  patch 4 (64 patches + [CLS]), d=128, 4 layers, 4 heads, MLP 512, 2000 steps of 64
         images: 87.6% validation and 87.7% test accuracy (chance: 10%) in 17 minutes on the
         2-core reference CPU (measured once, seed 0).
  base   the ViT-B shape (12 layers, d=768, 12 heads, MLP 3072) on 4 x 4 patches of the 32 x 32
         images (ViT-B/4), drop path 0.1; one GPU. Not yet measured.
  tiny   patch 8, d=32, 2 layers; a CPU in seconds (tests/test_configs.py).
Optimizer: ViT's AdamW, betas (0.9, 0.999), clip 1.0, warmup then cosine decay, with DeiT's
from-scratch settings for small data (Touvron et al. 2021): weight decay 0.05, label smoothing
0.1, peak lr 5e-4 per 512 images (1e-3 for the small model).
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, patch=8, batch=8, steps=2, lr=1e-3, drop_path=0.0),
    'small': dict(d=128, layers=4, heads=4, patch=4, batch=64, steps=2000, lr=1e-3,
                  drop_path=0.0),
    'base': dict(d=768, layers=12, heads=12, patch=4, batch=512, steps=20_000, lr=5e-4,
                 drop_path=0.1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  image = 32
  model = family_dict(
      'vit', d_model=s['d'], num_layers=s['layers'], attention=dict(num_heads=s['heads']),
      ffn=dict(hidden_dim=4 * s['d']), image_size=image, patch_size=s['patch'], num_labels=10,
      pooler=False, drop_path=s['drop_path'], max_length=(image // s['patch']) ** 2 + 1)
  data = dict(name='synthetic_images', task='classification', seq_len=1)
  optim = dict(optimizer='adamw', lr=s['lr'], weight_decay=0.05, schedule='warmup_cosine',
               warmup_steps=max(1, s['steps'] // 20), grad_clip_norm=1.0)
  train = cadence(s['batch'], s['steps'], logs=50, evals=5, label_smoothing=0.1)
  return default_config(model=model, data=data, optim=optim, train=train)
