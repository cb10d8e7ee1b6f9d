"""synthetic_images: an offline, TF-free image classification set for ViT."""

import random
import sys

import numpy as np

from jaxformer.data import DataConfig, make_pipeline
from jaxformer.data.builders import IMAGE_CLASSES, draw_image


def test_drawing_is_seeded_and_every_class_is_a_visible_pattern():
  a = [draw_image(random.Random(7), 32) for _ in range(1)]
  b = [draw_image(random.Random(7), 32) for _ in range(1)]
  np.testing.assert_array_equal(a[0][0], b[0][0])
  rng = random.Random(0)
  seen = set()
  for _ in range(400):
    img, label = draw_image(rng, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # Foreground and background differ by >= 80 in some channel: the pattern is visible.
    assert np.ptp(img.reshape(-1, 3).astype(int), axis=0).max() > 60
    seen.add(label)
  assert seen == set(range(len(IMAGE_CLASSES)))


def test_pipeline_reads_images_without_tensorflow(tmp_path):
  cfg = DataConfig.from_dict(dict(
      name='synthetic_images', task='classification', data_dir=str(tmp_path),
      builder_config=dict(num_train=64, num_validation=16, num_test=16)))
  batch = next(make_pipeline(cfg, 'train', batch_size=8, seed=0))
  assert batch['images'].shape == (8, 32, 32, 3)
  assert batch['images'].min() >= -1.0 and batch['images'].max() <= 1.0
  assert batch['label'].shape == (8,) and batch['label'].max() < len(IMAGE_CLASSES)
  assert 'tensorflow' not in sys.modules
  again = next(make_pipeline(cfg, 'train', batch_size=8, seed=0))
  np.testing.assert_array_equal(batch['images'], again['images'])
