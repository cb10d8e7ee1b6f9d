"""Learning-rate schedules (CATALOG F2): values at given steps equal the hand formulas."""

import math

import jax
import numpy as np
import pytest

from jaxformer.config import ConfigError
from jaxformer.train.optimizer import OptimConfig
from jaxformer.train.schedules import make_schedule

LR, W, S = 0.5, 10, 110
STEPS = [0, 1, 5, 9, 10, 11, 37, 60, 87, 100, 109, 110, 150]


def _cosine(step, end):
  if step < W:
    return LR * step / W
  t = min((step - W) / (S - W), 1.0)
  return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * t))


def _linear(step, end):
  if step < W:
    return LR * step / W
  return LR + (end - LR) * min((step - W) / (S - W), 1.0)


def _inverse_sqrt(step):
  return LR * min(step / W, math.sqrt(W / max(step, 1)))


def _wsd(shape, fraction, end):
  decay = round(fraction * S)
  start = S - decay

  def value(step):
    if step < W:
      return LR * step / W
    t = min(max((step - start) / decay, 0.0), 1.0)
    f = {'linear': t, 'cosine': 0.5 * (1 - math.cos(math.pi * t)), 'sqrt': 1 - math.sqrt(1 - t)}
    return LR - (LR - end) * f[shape]

  return value


@pytest.mark.parametrize('cfg, formula', [
    (dict(schedule='constant'), lambda s: LR),
    (dict(schedule='constant', warmup_steps=W), lambda s: LR * min(s / W, 1.0)),
    (dict(schedule='warmup_cosine', warmup_steps=W, total_steps=S, end_lr_ratio=0.1),
     lambda s: _cosine(s, 0.1 * LR)),
    (dict(schedule='warmup_linear', warmup_steps=W, total_steps=S), lambda s: _linear(s, 0.0)),
    (dict(schedule='warmup_linear', warmup_steps=0, total_steps=S, end_lr_ratio=0.2),
     lambda s: LR + (0.2 * LR - LR) * min(s / S, 1.0)),
    (dict(schedule='inverse_sqrt', warmup_steps=W), _inverse_sqrt),
    (dict(schedule='wsd', warmup_steps=W, total_steps=S, wsd_decay_fraction=0.2),
     _wsd('linear', 0.2, 0.0)),
    (dict(schedule='wsd', warmup_steps=W, total_steps=S, wsd_decay_fraction=0.3,
          wsd_decay_shape='cosine', end_lr_ratio=0.1), _wsd('cosine', 0.3, 0.1 * LR)),
    (dict(schedule='wsd', warmup_steps=W, total_steps=S, wsd_decay_fraction=0.5,
          wsd_decay_shape='sqrt'), _wsd('sqrt', 0.5, 0.0)),
])
def test_schedule_values(cfg, formula):
  schedule = jax.jit(make_schedule(OptimConfig.from_dict(dict(cfg, lr=LR))))
  got = np.array([float(schedule(s)) for s in STEPS])
  want = np.array([formula(s) for s in STEPS])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_inverse_sqrt_is_noam():
  """lr = (d_model * W)^-0.5 gives the Transformer paper's eq. 3 at every step >= 1."""
  d_model, warmup = 512, 4000
  schedule = make_schedule(OptimConfig(schedule='inverse_sqrt', lr=(d_model * warmup) ** -0.5,
                                       warmup_steps=warmup))
  for step in (1, 100, 3999, 4000, 4001, 50000):
    noam = d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
    np.testing.assert_allclose(float(schedule(step)), noam, rtol=1e-5)


def test_wsd_is_stable_before_the_decay():
  schedule = make_schedule(OptimConfig(schedule='wsd', lr=LR, warmup_steps=W, total_steps=S,
                                       wsd_decay_fraction=0.2))
  np.testing.assert_allclose([float(schedule(s)) for s in range(W, S - 22)], LR, rtol=1e-7)
  assert float(schedule(S - 10)) < LR


def test_wsd_decay_must_start_after_warmup():
  with pytest.raises(ConfigError, match='optim.wsd_decay_fraction'):
    OptimConfig(schedule='wsd', warmup_steps=50, total_steps=100, wsd_decay_fraction=0.6).validate()
