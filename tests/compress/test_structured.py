"""Structured pruning (CATALOG H): the shrunk model equals the dense model with the pruned
heads' W^O slices and neurons' W2 rows set to zero; GQA prunes whole groups."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer.compress import structured as S
from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models import build_model, family_dict

D, N, K, F = 32, 4, 2, 48


def _model(**over):
  cfg = ModelConfig.from_dict(family_dict(
      'llama', vocab_size=64, max_length=16, d_model=D, num_layers=2,
      attention=dict(num_heads=N, num_kv_heads=K), ffn=dict(hidden_dim=F), **over))
  model = build_model(cfg, seed=0)
  return cfg, model


def test_shrunk_model_equals_masked_dense_model():
  cfg, model = _model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  choices = S.choose(cfg, params, heads=2, neurons=16)
  new_cfg, new_params = S.shrink(cfg, params, choices)
  assert (new_cfg.num_heads, new_cfg.num_kv_heads, new_cfg.head_dim,
          new_cfg.ffn_hidden_dim) == (2, 1, D // N, F - 16)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 16))
  small_def, _, small_rest = nnx.split(build_model(new_cfg, seed=1), nnx.Param, ...)
  run = lambda g, r: lambda p: jax.jit(  # noqa: E731
      lambda p, r: nnx.merge(g, p, r)(tokens, deterministic=True).logits)(p, r)
  dense = run(graphdef, rest)
  masked = dense(S.masked(params, choices))
  np.testing.assert_allclose(np.asarray(run(small_def, small_rest)(new_params)),
                             np.asarray(masked), atol=1e-5)
  # Not the trivial case: the layers keep different heads, and removing them changes the model.
  kept = [c.keep['kv_heads'] for c in choices.values() if 'kv_heads' in c.keep][0]
  assert kept.shape == (2, 1)
  assert np.max(np.abs(np.asarray(dense(params) - masked))) > 1e-3
  # The kept heads are the ones with the largest W^O norms, and the bytes shrink.
  wo = np.asarray(params['stack']['layers']['blocks'][0]['self_attn']['wo'].get_value())
  norms = np.sqrt((wo ** 2).sum((-2, -1)).reshape(2, K, N // K).sum(-1))
  assert np.array_equal(kept[:, 0], norms.argmax(-1))
  assert S.num_bytes(new_params) < S.num_bytes(params)


@pytest.mark.parametrize('heads, neurons, message', [
    (1, 0, r'--heads=1 is invalid: .*multiple of 2'),
    (4, 0, r'--heads=4 is invalid: the model has 4 heads'),
    (0, F, r'--neurons=48 is invalid'),
])
def test_bad_counts_are_refused(heads, neurons, message):
  cfg, model = _model()
  with pytest.raises(ConfigError, match=message):
    S.choose(cfg, nnx.state(model, nnx.Param), heads=heads, neurons=neurons)


def test_alibi_heads_are_refused():
  cfg, model = _model(position=dict(kind='alibi'))
  with pytest.raises(ConfigError, match='ALiBi'):
    S.choose(cfg, nnx.state(model, nnx.Param), heads=2)
