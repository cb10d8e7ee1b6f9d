"""Training objectives (CATALOG F3 label smoothing / z-loss, F6), computed in float32.

Shapes: `...` is any leading batch shape (B, or B T); V vocabulary or classes.
Every loss is a weighted mean over `mask` (1 = counts, 0 = padding; fractional weights allowed)
and returns `(loss, metrics)`; `metrics['num_tokens']` is the weight sum, so a caller can combine
batches of different sizes exactly.

  cross_entropy   l = (1 - eps) * nll + eps * (lse - mean_v z_v) + z_loss * lse^2
                  nll = lse - z_y, lse = log sum_v exp z_v. The eps term is the cross entropy
                  against the uniform distribution (Szegedy et al. 2016, label smoothing with
                  eps / V on every class, the target included, as torch's label_smoothing);
                  z-loss is PaLM's (Chowdhery et al. 2022, sec. 5) auxiliary loss.
  distillation    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
                  (Hinton et al. 2015); the teacher gets no gradient.
  replaced-token  ELECTRA (Clark et al. 2020): sigmoid binary cross entropy of the
  detection       discriminator logit per token against "this token was replaced".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def _weights(mask, shape) -> jax.Array:
  return jnp.ones(shape, jnp.float32) if mask is None else jnp.broadcast_to(
      jnp.asarray(mask, jnp.float32), shape)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w); 0 when every weight is 0 (and no NaN gradient then)."""
  total = jnp.sum(weights)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(weights * values) / safe, 0.0)


def label_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """z_y [...] from logits [..., V]: a masked sum over the vocabulary rather than a gather.

  Under tensor parallelism the logits are split over the vocabulary; a sum partitions into local
  sums and one all-reduce of [...] values, where a gather along the split axis would make XLA
  gather the whole [..., V] logits onto every device (vocab-parallel cross entropy, Megatron).
  """
  hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, *, mask: jax.Array | None = None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Token cross entropy with label smoothing and z-loss.

  Args:
    logits: [..., V] in any dtype (upcast to float32).
    targets: [...] integer ids in [0, V).
    mask: [...] weights, or None for all ones.
    label_smoothing: eps in [0, 1).
    z_loss: coefficient of lse^2.
  Returns:
    (loss, metrics) with metrics loss, nll (unsmoothed, for perplexity), z_loss (the added
    term), accuracy (argmax == target) and num_tokens (weight sum).
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - label_logit(logits, targets)
  per_token = nll
  if label_smoothing:
    uniform = lse - jnp.mean(logits, axis=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  z_term = z_loss * jnp.square(lse)
  if z_loss:
    per_token = per_token + z_term
  w = _weights(mask, nll.shape)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  loss = weighted_mean(per_token, w)
  metrics = {
      'loss': loss,
      'nll': weighted_mean(nll, w),
      'z_loss': weighted_mean(z_term, w),
      'accuracy': weighted_mean(correct, w),
      'num_tokens': jnp.sum(w),
  }
  return loss, metrics


def perplexity(nats_per_token: jax.Array) -> jax.Array:
  return jnp.exp(nats_per_token)


def bits_per_byte(nats_per_token, bytes_per_token):
  """Bits per byte from a mean token NLL in nats: nats / ln 2 / (bytes per token)."""
  return nats_per_token / math.log(2.0) / bytes_per_token


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      targets: jax.Array | None = None, *, temperature: float = 1.0,
                      alpha: float = 0.5, mask: jax.Array | None = None):
  """Hinton distillation; `targets` may be None when alpha == 1 (pure soft targets).

  The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones.
  Returns (loss, metrics) with loss, kl (at temperature T, before T^2), ce and num_tokens.
  """
  if targets is None and alpha != 1.0:
    raise ValueError(f'distillation_loss needs targets when alpha={alpha} < 1')
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  pt = jnp.exp(log_pt)
  kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)
  w = _weights(mask, kl.shape)
  kl_mean = weighted_mean(kl, w)
  loss = alpha * temperature ** 2 * kl_mean
  metrics = {'kl': kl_mean, 'num_tokens': jnp.sum(w)}
  if targets is not None:
    ce, _ = cross_entropy(s, targets, mask=w)
    loss = loss + (1.0 - alpha) * ce
    metrics['ce'] = ce
  metrics['loss'] = loss
  return loss, metrics


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, *,
                                  weights: jax.Array | None = None, label_smoothing: float = 0.0,
                                  regression: bool = False):
  """One label per sequence: logits [B, C], labels [B].

  Classification is `cross_entropy` over C classes; `regression=True` (C = 1, float labels, as
  STS-B) is the mean squared error of logits[:, 0].
  Returns (loss, metrics) with loss, accuracy (classification) or mse, and num_examples.
  """
  if regression:
    err = jnp.square(logits[..., 0].astype(jnp.float32) - labels.astype(jnp.float32))
    w = _weights(weights, err.shape)
    loss = weighted_mean(err, w)
    return loss, {'loss': loss, 'mse': loss, 'num_examples': jnp.sum(w)}
  loss, m = cross_entropy(logits, labels, mask=weights, label_smoothing=label_smoothing)
  return loss, {'loss': loss, 'accuracy': m['accuracy'], 'num_examples': m['num_tokens']}


def replaced_token_detection_loss(logits: jax.Array, is_replaced: jax.Array, *,
                                  mask: jax.Array | None = None):
  """ELECTRA discriminator loss: logits [...] (one per token), is_replaced [...] in {0, 1}.

  Returns (loss, metrics) with loss, accuracy (logit > 0 predicts replaced) and num_tokens.
  """
  logits = logits.astype(jnp.float32)
  labels = jnp.asarray(is_replaced, jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  w = _weights(mask, bce.shape)
  correct = ((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
  loss = weighted_mean(bce, w)
  return loss, {'loss': loss, 'accuracy': weighted_mean(correct, w), 'num_tokens': jnp.sum(w)}
