"""A4, A5: Bahdanau and Luong attention against float64 numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.attention.rnn_attention import BahdanauAttention, LuongAttention

B, S, Q, C = 3, 5, 6, 4
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)


def _data(q_dim=Q, seed=0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(B, q_dim)).astype(np.float32),
          r.normal(size=(B, S, C)).astype(np.float32))


def np_attend(e, keys, mask):
  w = np.zeros_like(e)
  for b in range(e.shape[0]):
    idx = np.flatnonzero(mask[b])
    if idx.size:
      z = np.exp(e[b, idx] - e[b, idx].max())
      w[b, idx] = z / z.sum()
  return np.einsum('bs,bsc->bc', w, keys), w


def _w(p):
  return np.asarray(p[...], np.float64)


def _check(m, query, keys, e):
  ctx, w = m(jnp.asarray(query), jnp.asarray(keys), jnp.asarray(MASK))
  ref_ctx, ref_w = np_attend(e, np.asarray(keys, np.float64), MASK)
  np.testing.assert_allclose(w, ref_w, atol=1e-6)
  np.testing.assert_allclose(ctx, ref_ctx, atol=1e-5)
  assert np.all(np.asarray(w)[2] == 0) and np.all(np.asarray(ctx)[2] == 0)
  np.testing.assert_allclose(np.asarray(w)[:2].sum(-1), 1.0, atol=1e-6)


def test_bahdanau():
  m = BahdanauAttention(Q, C, 7, rngs=nnx.Rngs(0))
  query, keys = _data()
  q64, k64 = query.astype(np.float64), keys.astype(np.float64)
  hidden = np.tanh((q64 @ _w(m.w))[:, None, :] + np.einsum('bsc,ca->bsa', k64, _w(m.u)))
  e = np.einsum('bsa,a->bs', hidden, _w(m.v))
  _check(m, query, keys, e)
  ctx, _ = m(query, keys, MASK, projected_keys=m.project_keys(keys))
  np.testing.assert_allclose(ctx, m(query, keys, MASK)[0], atol=1e-6)


@pytest.mark.parametrize('kind,scaled', [('dot', False), ('dot', True), ('general', False),
                                         ('general', True), ('concat', False)])
def test_luong(kind, scaled):
  q_dim = C if kind == 'dot' else Q
  m = LuongAttention(kind, q_dim, C, scaled=scaled, hidden=9, rngs=nnx.Rngs(1))
  query, keys = _data(q_dim, seed=1)
  q64, k64 = query.astype(np.float64), keys.astype(np.float64)
  if kind == 'dot':
    e = np.einsum('bc,bsc->bs', q64, k64)
  elif kind == 'general':
    e = np.einsum('bq,qc,bsc->bs', q64, _w(m.w), k64)
  else:
    cat = np.concatenate([np.repeat(q64[:, None], S, 1), k64], -1)
    e = np.tanh(cat @ _w(m.w)) @ _w(m.v)
  if scaled:
    e = e / np.sqrt(C)
  _check(m, query, keys, e)


def test_luong_errors():
  with pytest.raises(ValueError, match='allowed values'):
    LuongAttention('bilinear', C, C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='query_dim == key_dim'):
    LuongAttention('dot', Q, C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='scaled'):
    LuongAttention('concat', Q, C, scaled=True, rngs=nnx.Rngs(0))
