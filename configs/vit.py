"""Vision Transformer (Dosovitskiy et al. 2021) for image classification.

    python -m jaxformer.train --config=configs/vit.py --workdir=runs/vit
    python -m jaxformer.train --config=configs/vit.py:size=tiny --workdir=runs/vit_tiny

Data: the offline `synthetic_images` set (10 classes of procedurally drawn shapes and textures,
32x32 RGB). CIFAR-10 is `--config.data.name=cifar10` on a machine where it has been prepared
(TFDS needs TensorFlow to *prepare* image datasets; reading is TF-free). Presets: tiny (CPU,
seconds; tests), small (CPU, minutes: patch 4, d=128, 4 layers), base (ViT-B/16 shape on 224
images: a GPU / TPU host). Expected result: not yet measured.
"""

from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

SIZES = {'tiny': dict(d=32, layers=2, heads=2, image=32, patch=8, batch=8, steps=2),
         'small': dict(d=128, layers=4, heads=4, image=32, patch=4, batch=64, steps=2000),
         'base': dict(d=768, layers=12, heads=12, image=224, patch=16, batch=512, steps=100_000)}


def get_config(arg=None):
  size = dict(kv.split('=') for kv in arg.split(','))['size'] if arg else 'small'
  if size not in SIZES:
    raise ValueError(f'size={size!r} is invalid: allowed values are {list(SIZES)}')
  s = SIZES[size]
  model = family_dict('vit', d_model=s['d'], num_layers=s['layers'],
                      attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=4 * s['d']),
                      image_size=s['image'], patch_size=s['patch'], num_labels=10, pooler=False,
                      max_length=(s['image'] // s['patch']) ** 2 + 1)
  data = dict(name='synthetic_images', task='classification', seq_len=1)
  optim = dict(optimizer='adamw', lr=1e-3, weight_decay=0.05, schedule='warmup_cosine',
               warmup_steps=max(1, s['steps'] // 20), total_steps=s['steps'], grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 50),
               eval_every=max(2, s['steps'] // 5), checkpoint_every=max(2, s['steps'] // 5),
               eval_batches=8, test_batches=8)
  return default_config(model=model, data=data, optim=optim, train=train)
