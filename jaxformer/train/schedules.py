"""Learning-rate schedules (CATALOG F2) as `optax.Schedule`s: step -> learning rate.

`step` is the number of optimizer updates already applied (optax's count: 0 for the first
update), so every warmup starts at 0. With gradient accumulation the schedule counts optimizer
updates, not micro-batches. Past `total_steps` every decaying schedule holds its final value.
With peak `lr`, warmup W, total steps S and final value `end = lr * end_lr_ratio`:

  constant       lr * min(1, step / W)                            (no warmup when W = 0)
  warmup_linear  linear 0 -> lr over W, then lr -> end over S - W
  warmup_cosine  linear 0 -> lr over W, then end + (lr - end) * (1 + cos(pi * t)) / 2,
                 t = (step - W) / (S - W)                          (Loshchilov & Hutter 2017)
  inverse_sqrt   lr * min(step / W, sqrt(W / step))                (Vaswani et al. 2017, eq. 3)
  wsd            warmup 0 -> lr over W, stable at lr, then decay lr -> end over the last
                 round(wsd_decay_fraction * S) steps               (Hu et al. 2024, MiniCPM;
                 Hagele et al. 2024). The decay shape is linear, cosine or 1-sqrt:
                 lr - (lr - end) * f(t), f(t) = t | (1 - cos(pi t)) / 2 | 1 - sqrt(1 - t).

inverse_sqrt is normalised so that `lr` is the peak, reached at step W. The Transformer paper's
`d_model^-0.5 * min(step^-0.5, step * W^-1.5)` is this schedule with lr = (d_model * W)^-0.5.
"""

from __future__ import annotations

import typing

import jax.numpy as jnp
import optax

from jaxformer.config import ConfigError

if typing.TYPE_CHECKING:
  from jaxformer.train.optimizer import OptimConfig

SCHEDULES = ('constant', 'warmup_linear', 'warmup_cosine', 'inverse_sqrt', 'wsd')
WSD_DECAY_SHAPES = ('linear', 'cosine', 'sqrt')


def _warmup(lr: float, warmup_steps: int, step):
  """lr * step / W, clipped to lr; lr everywhere when W = 0."""
  if warmup_steps <= 0:
    return jnp.full_like(step, lr, dtype=jnp.float32)
  return lr * jnp.minimum(step / warmup_steps, 1.0)


def constant(lr: float, warmup_steps: int = 0) -> optax.Schedule:
  return lambda step: _warmup(lr, warmup_steps, jnp.asarray(step, jnp.float32))


def warmup_linear(lr: float, warmup_steps: int, total_steps: int,
                  end_lr_ratio: float = 0.0) -> optax.Schedule:
  end = lr * end_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    return jnp.where(step < warmup_steps, _warmup(lr, warmup_steps, step), lr + (end - lr) * t)

  return schedule


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int,
                  end_lr_ratio: float = 0.0) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=lr * end_lr_ratio)


def inverse_sqrt(lr: float, warmup_steps: int) -> optax.Schedule:
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return lr * jnp.minimum(step / warmup_steps, jnp.sqrt(warmup_steps / jnp.maximum(step, 1.0)))

  return schedule


def wsd(lr: float, warmup_steps: int, total_steps: int, decay_fraction: float,
        end_lr_ratio: float = 0.0, decay_shape: str = 'linear') -> optax.Schedule:
  end = lr * end_lr_ratio
  decay_steps = max(round(decay_fraction * total_steps), 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # The fraction of the decay still ahead, r = 1 - t, is exact at the last step.
    r = jnp.clip((total_steps - step) / decay_steps, 0.0, 1.0)
    if decay_shape == 'linear':
      g = r
    elif decay_shape == 'cosine':
      g = 0.5 * (1.0 + jnp.cos(jnp.pi * (1.0 - r)))
    else:
      g = jnp.sqrt(r)
    return jnp.minimum(_warmup(lr, warmup_steps, step), end + (lr - end) * g)

  return schedule


def make_schedule(cfg: 'OptimConfig') -> optax.Schedule:
  """The schedule named by `cfg.schedule`; `cfg` is a validated OptimConfig."""
  kind = cfg.schedule
  if kind == 'constant':
    return constant(cfg.lr, cfg.warmup_steps)
  if kind == 'inverse_sqrt':
    return inverse_sqrt(cfg.lr, cfg.warmup_steps)
  if cfg.total_steps is None:
    raise ConfigError(f'optim.total_steps=None is invalid here: schedule={kind!r} needs its '
                      'length (the trainer sets it to train.steps; set it when building an '
                      'optimizer directly)')
  if kind == 'warmup_linear':
    return warmup_linear(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.end_lr_ratio)
  if kind == 'warmup_cosine':
    return warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.end_lr_ratio)
  if kind == 'wsd':
    return wsd(cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.wsd_decay_fraction,
               cfg.end_lr_ratio, cfg.wsd_decay_shape)
  raise ValueError(f'unknown schedule {kind!r}; allowed: {SCHEDULES}')
