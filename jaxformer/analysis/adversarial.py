"""FGSM and PGD on the input token embeddings, and adversarial training (CATALOG I).

Shapes: delta [B, T, E], the shift of the source token embeddings (inputs.py); L(delta) the
task loss of the model with embeddings e + delta.

  FGSM (Goodfellow et al. 2015)  delta = eps sign(grad L(0))
  PGD  (Madry et al. 2018)       delta_0 = 0, or U(-eps, eps)^{B T E} (random start);
                                 delta_{k+1} = clip(delta_k + a sign(grad L(delta_k)), -eps, eps)
                                 for k < K; a = 2.5 eps / K unless given (Madry et al.'s
                                 choice); returns delta_K.
Both are L_inf attacks: max |delta| <= eps exactly (FGSM's entries are +-eps or 0, PGD projects
by clipping after every step).

Adversarial training (`train.adversarial`): the training loss is

    (1 - w) L(0) + w L(stop_gradient(delta*)),   delta* = FGSM or PGD at eps

(Goodfellow et al. 2015 eq. 6 with alpha = 1 - w; w = 1 is Madry et al.'s min-max objective; the
attack is a constant for the parameter gradient, by Danskin's theorem). The attack uses the model
in training mode, so its passes draw their own dropout masks; PGD's random start draws from the
input embedder's dropout stream, which the train step keys by (seed, step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.analysis import inputs
from jaxformer.config import ConfigError

ATTACKS = ('none', 'fgsm', 'pgd')


def check_eps(eps: float, field: str = 'eps') -> None:
  if not eps > 0:
    raise ConfigError(f'{field}={eps} is invalid: the L_inf radius must be > 0')


def fgsm(loss: Callable[[jax.Array], jax.Array], shape, eps: float) -> jax.Array:
  """delta = eps sign(grad L(0)) [shape]."""
  check_eps(eps)
  g = jax.grad(loss)(jnp.zeros(shape, jnp.float32))
  return eps * jnp.sign(g)


def pgd(loss: Callable[[jax.Array], jax.Array], shape, eps: float, steps: int, *,
        step_size: float | None = None, key: jax.Array | None = None) -> jax.Array:
  """K = `steps` projected sign-gradient ascent steps from 0, or from U(-eps, eps) given `key`."""
  check_eps(eps)
  if steps < 1:
    raise ConfigError(f'steps={steps} is invalid: PGD needs at least 1 step')
  a = 2.5 * eps / steps if not step_size else step_size
  if a <= 0:
    raise ConfigError(f'step_size={step_size} is invalid: it must be > 0')
  delta = (jnp.zeros(shape, jnp.float32) if key is None
           else jax.random.uniform(key, shape, jnp.float32, -eps, eps))
  grad = jax.grad(loss)

  def body(_, d):
    return jnp.clip(d + a * jnp.sign(grad(d)), -eps, eps)

  return jax.lax.fori_loop(0, steps, body, delta)


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
  """The `train.adversarial*` fields (see jaxformer/train/experiment.py)."""
  attack: str = 'none'
  eps: float = 0.01
  steps: int = 3
  step_size: float = 0.0  # 0: 2.5 eps / steps
  weight: float = 0.5
  random_start: bool = True


def adversarial_loss(model: nnx.Module, objective: Callable[[nnx.Module], tuple],
                     ids: jax.Array, cfg: AdversarialConfig):
  """(1 - w) clean + w adversarial -> (total, metrics).

  `objective(model) -> (total loss, metrics)` is the task loss; `ids` [B, T] the source tokens
  (for the shape of delta). Metrics are the clean pass's, plus clean_loss, adversarial_loss and
  total_loss (the combined objective that is differentiated).
  """
  shape = inputs.delta_shape(model, ids)
  g = inputs.embedding_function(model, objective)

  def advance(delta):
    (total, metrics), state = g(delta)
    nnx.update(model, state)  # dropout counters move on: every pass draws its own masks
    return total, metrics

  clean, metrics = advance(jnp.zeros(shape, jnp.float32))
  attack_loss = lambda d: g(d)[0][0]  # noqa: E731
  if cfg.attack == 'fgsm':
    delta = fgsm(attack_loss, shape, cfg.eps)
  elif cfg.attack == 'pgd':
    key = None
    if cfg.random_start:
      key = inputs.input_embedder(model).dropout.rngs()
    delta = pgd(attack_loss, shape, cfg.eps, cfg.steps, step_size=cfg.step_size or None,
                key=key)
  else:
    raise ConfigError(f'train.adversarial={cfg.attack!r} is invalid: allowed values are '
                      f'{list(ATTACKS)}')
  adv, _ = advance(jax.lax.stop_gradient(delta))
  total = (1.0 - cfg.weight) * clean + cfg.weight * adv
  metrics = dict(metrics, clean_loss=clean, adversarial_loss=adv, total_loss=total)
  return total, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
