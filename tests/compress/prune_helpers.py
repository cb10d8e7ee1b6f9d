"""Tiny experiments and batches for the compression tests."""

import os

import jax
import numpy as np

from jaxformer.train.experiment import Experiment, load_config
from jaxformer.train.program import TrainProgram
from jaxformer.train.trainer import make_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(prune=None, distill=None, mesh=None, model=None, **train):
  config = load_config(os.path.join(ROOT, 'configs', 'quickstart.py'), 'size=tiny')
  # A rolled scan compiles faster than the preset's unrolled one; MHA splits over tensor=2.
  config.model.update(dict(scan_unroll=1), **(model or {}))
  config.model.attention.num_kv_heads = 2
  config.compress.prune.update(prune or {})
  config.compress.distill.update(distill or {})
  config.train.update(dict(progress=False, async_checkpoint=False, tensorboard=False), **train)
  config.optim.update(weight_decay=0.1, warmup_steps=1, total_steps=100)
  if mesh:
    config.parallel.mesh.update(mesh)
  return config


def program(config, devices=None):
  exp = Experiment.from_config(config)
  return TrainProgram(exp, make_layout(exp.parallel, devices))


def batch(seed, rows=4, length=32, vocab=260):
  x = np.random.default_rng(seed).integers(4, vocab, (rows, length + 1)).astype(np.int32)
  return {'inputs': x[:, :-1], 'targets': x[:, 1:]}


def put(prog, b):
  return {k: jax.device_put(v, prog.batch_sharding) for k, v in b.items()}
