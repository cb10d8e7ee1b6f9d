"""Objectives (CATALOG F3 label smoothing / z-loss, F6) against float64 numpy oracles."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.train import losses

B, T, V = 2, 5, 7


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
  return z - lse, lse[..., 0]


def _data(seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = (3.0 * jax.random.normal(k1, (B, T, V))).astype(dtype)
  targets = jax.random.randint(k2, (B, T), 0, V)
  mask = (jax.random.uniform(k3, (B, T)) > 0.3).astype(jnp.float32).at[0, 0].set(1.0)
  return logits, targets, mask


def _np_cross_entropy(logits, targets, mask, eps, z):
  logp, lse = _np_log_softmax(logits)
  q = np.full(logp.shape, eps / V) + (1 - eps) * np.eye(V)[np.asarray(targets)]
  per = -(q * logp).sum(-1) + z * lse ** 2
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(mask, np.float64)
  acc = (np.asarray(logits).argmax(-1) == np.asarray(targets))
  return (w * per).sum() / w.sum(), (w * nll).sum() / w.sum(), (w * acc).sum() / w.sum()


@pytest.mark.parametrize('eps, z', [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_cross_entropy_numpy_oracle(eps, z):
  logits, targets, mask = _data()
  loss, m = losses.cross_entropy(logits, targets, mask=mask, label_smoothing=eps, z_loss=z)
  want, nll, acc = _np_cross_entropy(logits, targets, mask, eps, z)
  np.testing.assert_allclose(loss, want, atol=1e-5)
  np.testing.assert_allclose(m['loss'], want, atol=1e-5)
  np.testing.assert_allclose(m['nll'], nll, atol=1e-5)
  np.testing.assert_allclose(m['accuracy'], acc, atol=1e-6)
  assert float(m['num_tokens']) == float(mask.sum())
  if z:
    _, lse = _np_log_softmax(logits)
    w = np.asarray(mask, np.float64)
    np.testing.assert_allclose(m['z_loss'], z * (w * lse ** 2).sum() / w.sum(), rtol=1e-5)


def test_cross_entropy_in_float32_from_bf16_logits_and_masked_positions_ignored():
  logits, targets, mask = _data(dtype=jnp.bfloat16)
  loss, _ = losses.cross_entropy(logits, targets, mask=mask, label_smoothing=0.1)
  assert loss.dtype == jnp.float32
  want, _, _ = _np_cross_entropy(np.asarray(logits.astype(jnp.float32)), targets, mask, 0.1, 0.0)
  np.testing.assert_allclose(loss, want, atol=1e-5)
  # changing a masked-out position changes nothing, and its gradient is zero
  i = np.argwhere(np.asarray(mask) == 0)[0]
  moved = logits.at[i[0], i[1]].add(5.0)
  np.testing.assert_allclose(losses.cross_entropy(moved, targets, mask=mask,
                                                  label_smoothing=0.1)[0], loss, atol=1e-6)
  g = jax.grad(lambda l: losses.cross_entropy(l, targets, mask=mask)[0])(
      logits.astype(jnp.float32))
  np.testing.assert_array_equal(g[i[0], i[1]], 0.0)


def test_cross_entropy_all_masked_is_zero_without_nan_gradient():
  logits, targets, _ = _data()
  zero = jnp.zeros((B, T))
  loss, m = losses.cross_entropy(logits, targets, mask=zero)
  assert float(loss) == 0.0 and float(m['num_tokens']) == 0.0
  g = jax.grad(lambda l: losses.cross_entropy(l, targets, mask=zero)[0])(logits)
  chex.assert_tree_all_finite(g)


def test_perplexity_and_bits_per_byte():
  np.testing.assert_allclose(losses.perplexity(jnp.float32(math.log(10.0))), 10.0, rtol=1e-6)
  # 2 nats per token, 4 bytes per token -> 2 / ln 2 / 4 bits per byte
  np.testing.assert_allclose(losses.bits_per_byte(2.0, 4.0), 2.0 / math.log(2.0) / 4.0)


@pytest.mark.parametrize('temperature, alpha', [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0)])
def test_distillation_numpy_oracle(temperature, alpha):
  student, targets, mask = _data(1)
  teacher, _, _ = _data(2)
  loss, m = losses.distillation_loss(student, teacher, targets if alpha < 1 else None,
                                     temperature=temperature, alpha=alpha, mask=mask)
  log_ps, _ = _np_log_softmax(np.asarray(student, np.float64) / temperature)
  log_pt, _ = _np_log_softmax(np.asarray(teacher, np.float64) / temperature)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  w = np.asarray(mask, np.float64)
  kl = (w * kl).sum() / w.sum()
  ce = _np_cross_entropy(student, targets, mask, 0.0, 0.0)[0]
  want = alpha * temperature ** 2 * kl + (1 - alpha) * ce
  np.testing.assert_allclose(loss, want, atol=1e-5)
  np.testing.assert_allclose(m['kl'], kl, atol=1e-5)
  # the teacher is a constant
  g = jax.grad(lambda t: losses.distillation_loss(student, t, targets, temperature=temperature,
                                                  alpha=alpha, mask=mask)[0])(teacher)
  np.testing.assert_array_equal(g, 0.0)


def test_distillation_is_zero_kl_for_identical_logits():
  student, targets, _ = _data(3)
  _, m = losses.distillation_loss(student, student, targets, temperature=3.0, alpha=0.5)
  np.testing.assert_allclose(m['kl'], 0.0, atol=1e-6)


def test_sequence_classification_numpy_oracle():
  k1, k2 = jax.random.split(jax.random.key(4))
  logits = jax.random.normal(k1, (6, 3))
  labels = jax.random.randint(k2, (6,), 0, 3)
  weights = jnp.array([1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
  loss, m = losses.sequence_classification_loss(logits, labels, weights=weights)
  logp, _ = _np_log_softmax(logits)
  nll = -logp[np.arange(6), np.asarray(labels)]
  w = np.asarray(weights, np.float64)
  np.testing.assert_allclose(loss, (w * nll).sum() / w.sum(), atol=1e-6)
  acc = np.asarray(logits).argmax(-1) == np.asarray(labels)
  np.testing.assert_allclose(m['accuracy'], (w * acc).sum() / w.sum(), atol=1e-6)
  assert float(m['num_examples']) == 4.5

  preds = jnp.array([[0.5], [2.0], [-1.0]])
  gold = jnp.array([1.0, 1.5, 0.0])
  loss, m = losses.sequence_classification_loss(preds, gold, regression=True)
  np.testing.assert_allclose(loss, np.mean([0.25, 0.25, 1.0]), atol=1e-7)


def test_replaced_token_detection_numpy_oracle():
  k1, k2 = jax.random.split(jax.random.key(5))
  logits = 2.0 * jax.random.normal(k1, (B, T))
  replaced = jax.random.bernoulli(k2, 0.3, (B, T))
  _, _, mask = _data()
  loss, m = losses.replaced_token_detection_loss(logits, replaced, mask=mask)
  z = np.asarray(logits, np.float64)
  y = np.asarray(replaced, np.float64)
  bce = np.logaddexp(0.0, z) - y * z  # -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))
  w = np.asarray(mask, np.float64)
  np.testing.assert_allclose(loss, (w * bce).sum() / w.sum(), atol=1e-6)
  acc = ((z > 0) == (y > 0))
  np.testing.assert_allclose(m['accuracy'], (w * acc).sum() / w.sum(), atol=1e-6)
