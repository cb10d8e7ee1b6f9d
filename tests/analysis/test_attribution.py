"""Gradient saliency and integrated gradients w.r.t. the input embeddings (CATALOG I)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis_models import tiny, tokens
from jaxformer.analysis import attribution, inputs
from jaxformer.config import ConfigError
from jaxformer.models import family


def _completeness(model, call, target, baseline, position=None, steps=64):
  ids = tokens()
  f = jax.jit(attribution.score_function(model, call, target, position=position))
  db = attribution.baseline_delta(model, ids, baseline)
  ig = jax.jit(attribution.integrated_gradients, static_argnums=(0, 2))(f, db, steps)
  fx, fb = f(jnp.zeros_like(db)), f(db)
  assert abs(float(fx - fb)) > 1e-3  # a non-trivial difference to account for
  return float(attribution.completeness_gap(ig, fx, fb))


def test_integrated_gradients_completeness_lm():
  """sum IG = f(x) - f(baseline) within 1% at 64 trapezoid steps (Sundararajan et al. 2017)."""
  m = tiny()
  x = tokens()
  assert _completeness(m, lambda m: m(x).logits, jnp.array([3, 5]), 'pad') < 0.01


@pytest.mark.slow
@pytest.mark.parametrize('name, baseline', [('gpt2', 'zero'), ('llama', 'pad')])
def test_integrated_gradients_completeness_two_layers(name, baseline):
  m = tiny(name)
  x = tokens()
  assert _completeness(m, lambda m: m(x).logits, jnp.array([3, 5]), baseline) < 0.01


@pytest.mark.slow
def test_integrated_gradients_completeness_classification_and_seq2seq():
  x = tokens()
  # A larger init so that the untrained classifier's output depends on its input at all.
  enc = tiny('bert', num_labels=3, mlm_head=False, pooler=True, num_layers=1, init_std=0.5)
  assert _completeness(enc, lambda m: m(x).logits, jnp.array([0, 2]), 'pad') < 0.01
  t5 = tiny('t5', num_layers=1)
  assert _completeness(t5, lambda m: m(x, x[:, :3]).logits, jnp.array([1, 4]), 'pad',
                       position=2) < 0.01


@pytest.mark.slow
def test_saliency_is_the_gradient():
  """<saliency, v> equals the central finite difference of f along v."""
  m = tiny()
  x = tokens()
  f = jax.jit(attribution.score_function(m, lambda m: m(x).logits, jnp.array([3, 5]),
                                         score='logit'))
  shape = inputs.delta_shape(m, x)
  g = jax.jit(attribution.saliency, static_argnums=(0, 1))(f, shape)
  v = jax.random.normal(jax.random.key(1), shape)
  v = v / jnp.linalg.norm(v)
  # The central difference's error is O(eps^2): measured 5.9e-4 relative at eps = 1e-2 and
  # 1.6e-5 at 1e-3, where float32 rounding (about ulp(f) / eps) is still far below 1e-3.
  eps = 1e-3
  fd = (f(eps * v) - f(-eps * v)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-3)
  assert attribution.per_token(g, 'norm').shape == (2, 6)


def test_the_hook_shifts_the_token_embeddings():
  """delta = e' - e gives the model exactly the embeddings of other ids."""
  m = tiny()
  x = tokens()
  y = (x + 1) % 260
  shift = inputs.token_embeddings(m, y) - inputs.token_embeddings(m, x)
  g = jax.jit(lambda d: inputs.embedding_function(m, lambda m: m(x).logits)(d)[0])
  want = nnx.jit(lambda m: (m(y).logits, m(x).logits))(m)
  np.testing.assert_allclose(g(shift), want[0], atol=1e-5)
  np.testing.assert_allclose(g(jnp.zeros_like(shift)), want[1], atol=1e-6)


@pytest.mark.parametrize('name', ['vit', 'swin', 'rnn_seq2seq'])
def test_families_without_token_embeddings_are_refused(name):
  cfg = types.SimpleNamespace(family=name, family_spec=family('llama').family_spec)
  from jaxformer.models import registry
  cfg.family_spec = registry.get(name)
  with pytest.raises(ConfigError, match='no token embeddings'):
    inputs.input_embedder(types.SimpleNamespace(cfg=cfg))


def test_bad_options_are_refused():
  with pytest.raises(ConfigError, match='baseline'):
    attribution.baseline_delta(tiny(), tokens(), 'mean')
  with pytest.raises(ConfigError, match='score'):
    attribution.output_score(jnp.zeros((1, 3)), jnp.zeros(1, jnp.int32), score='prob')
  with pytest.raises(ConfigError, match='at least 1 step'):
    attribution.trapezoid_weights(0)
