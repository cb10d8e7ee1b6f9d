"""Norms (CATALOG D1): numpy float64 oracles, fp32 statistics, config selection."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import LayerNorm, RMSNorm, ScaleNorm, make_norm

D = 32


def _x(seed=0, shape=(2, 5, D)):
  return np.random.default_rng(seed).normal(1.5, 3.0, shape).astype(np.float32)


def _randomise(module, seed=1):
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      p[...] = jnp.asarray(rng.normal(size=p.shape), p.dtype)


@pytest.mark.parametrize('use_bias', [True, False])
def test_layernorm_matches_numpy(use_bias):
  norm = LayerNorm(D, eps=1e-5, use_bias=use_bias, rngs=nnx.Rngs(0))
  _randomise(norm)
  x = _x().astype(np.float64)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  ref = ref * np.asarray(norm.scale[...], np.float64)
  if use_bias:
    ref = ref + np.asarray(norm.bias[...], np.float64)
  else:
    assert norm.bias is None
  chex.assert_trees_all_close(norm(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_numpy():
  norm = RMSNorm(D, eps=1e-6, rngs=nnx.Rngs(0))
  _randomise(norm)
  x = _x().astype(np.float64)
  ref = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  chex.assert_trees_all_close(norm(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_hf_llama_in_bf16():
  torch = pytest.importorskip('torch')
  llama = pytest.importorskip('transformers.models.llama.modeling_llama')
  ref_norm = llama.LlamaRMSNorm(D, eps=1e-6).to(torch.bfloat16)
  w = np.random.default_rng(3).normal(size=D).astype(np.float32)
  with torch.no_grad():
    ref_norm.weight.copy_(torch.tensor(w).to(torch.bfloat16))
  x = torch.tensor(_x()).to(torch.bfloat16)
  with torch.no_grad():
    ref = ref_norm(x).float().numpy()
  norm = RMSNorm(D, eps=1e-6, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  norm.scale[...] = jnp.asarray(w, jnp.bfloat16)
  out = norm(jnp.asarray(x.float().numpy(), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), ref)


def test_scalenorm_matches_numpy_and_init():
  norm = ScaleNorm(D, eps=1e-5, rngs=nnx.Rngs(0))
  assert norm.scale.shape == ()
  np.testing.assert_allclose(float(norm.scale[...]), np.sqrt(D), rtol=1e-7)
  x = _x().astype(np.float64)
  out = norm(jnp.asarray(x, jnp.float32))
  # At init every output vector has norm g = sqrt(d).
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), np.sqrt(D), rtol=1e-5)
  norm.scale[...] = jnp.asarray(0.7)
  ref = 0.7 * x / np.linalg.norm(x, axis=-1, keepdims=True)
  chex.assert_trees_all_close(norm(jnp.asarray(x, jnp.float32)), ref.astype(np.float32),
                              atol=1e-5, rtol=1e-5)
  # A zero vector stays finite (norm clamped at eps).
  chex.assert_tree_all_finite(norm(jnp.zeros((1, D))))


def test_statistics_in_float32_for_bf16_inputs():
  # A large mean: bf16 statistics would lose the small deviations entirely.
  x = (_x(2) * 0.01 + 200.0).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  xb64 = np.asarray(xb.astype(jnp.float32), np.float64)
  ref = (xb64 - xb64.mean(-1, keepdims=True)) / np.sqrt(xb64.var(-1, keepdims=True) + 1e-5)
  out = LayerNorm(D, rngs=nnx.Rngs(0))(xb)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=0.05, rtol=0.02)


def test_make_norm_selects_by_config():
  base = ModelConfig(d_model=D)
  ln = make_norm(base.replace(norm='layernorm', norm_eps=1e-3, norm_bias=False),
                 rngs=nnx.Rngs(0))
  assert isinstance(ln, LayerNorm) and ln.eps == 1e-3 and ln.bias is None
  rms = make_norm(base.replace(norm='rmsnorm', norm_eps=1e-6), rngs=nnx.Rngs(0))
  assert isinstance(rms, RMSNorm) and rms.eps == 1e-6
  sn = make_norm(base.replace(norm='scalenorm'), 8, rngs=nnx.Rngs(0))
  assert isinstance(sn, ScaleNorm)
  np.testing.assert_allclose(float(sn.scale[...]), np.sqrt(8))
  bf = make_norm(base.replace(norm='rmsnorm', dtype='bfloat16'), rngs=nnx.Rngs(0))
  assert bf(jnp.ones((1, D))).dtype == jnp.bfloat16
  assert bf.scale.dtype == jnp.float32


def test_norm_params_shard_like_embed():
  for norm in (LayerNorm(D, rngs=nnx.Rngs(0)), RMSNorm(D, rngs=nnx.Rngs(0))):
    for _, p in nnx.iter_graph(norm):
      if isinstance(p, nnx.Param):
        assert p.get_metadata()['out_sharding'] == ('embed',)
