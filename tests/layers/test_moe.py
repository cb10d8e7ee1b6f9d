"""Mixture of experts (CATALOG D5): dense-FFN equivalence, per-token loop oracles for every
router, HF Mixtral parity, aux-loss formulas, padding, jit and gradients."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError, FFNConfig, MoEConfig, ModelConfig
from jaxformer.layers import FeedForward, MoE, is_moe_layer

D, F, E, B, T = 16, 32, 4, 2, 8
_erf = np.vectorize(math.erf)
NP_ACT = {
    'relu': lambda x: np.maximum(x, 0.0),
    'gelu': lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
    'silu': lambda x: x / (1.0 + np.exp(-x)),
}


def _cfg(gated=True, bias=False, act='silu', **moe):
  moe = dict(dict(num_experts=E, top_k=2), **moe)
  family = 'encoder' if moe.get('router') == 'soft' else 'decoder'
  return ModelConfig(d_model=D, family=family).replace(
      ffn=FFNConfig(activation=act, gated=gated, bias=bias, hidden_dim=F), moe=MoEConfig(**moe))


def _randomise(module, seed=1, std=0.4):
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      p[...] = jnp.asarray(rng.normal(0.0, std, p.shape), p.dtype)
  return module


def _x(seed=0, shape=(B, T, D)):
  return np.random.default_rng(seed).normal(size=shape)


def _np(module, name):
  w = getattr(module, name, None)
  return None if w is None else np.asarray(w[...], np.float64)


def _np_expert(moe, cfg, e, x):
  act = NP_ACT[cfg.ffn.activation]

  def proj(w, b):
    bias = _np(moe, b)
    return x @ _np(moe, w)[e] + (0.0 if bias is None else bias[e])

  h = act(proj('wi_gate', 'bi_gate')) * proj('wi_up', 'bi_up') if cfg.ffn.gated else \
      act(proj('wi', 'bi'))
  bo = _np(moe, 'bo')
  return h @ _np(moe, 'wo')[e] + (0.0 if bo is None else bo[e])


def _softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def _loop_topk(moe, cfg, x, valid):
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if not valid[b, t]:
        continue
      p = _softmax(x[b, t] @ _np(moe, 'router'))
      idx = np.argsort(-p, kind='stable')[:cfg.moe.top_k]
      w = p[idx] / (p[idx].sum() if cfg.moe.normalize_top_k else 1.0)
      y[b, t] = sum(wi * _np_expert(moe, cfg, e, x[b, t]) for e, wi in zip(idx, w))
  return y


def _loop_capacity(moe, cfg, x, valid, cap):
  """The capacity rule, token by token: per row, token t's choices (best first) claim slots of
  their experts before token t + 1's; a choice over capacity adds nothing. Returns (y, kept),
  kept [B, T, k] True where the assignment was served."""
  k = cfg.moe.top_k if cfg.moe.router == 'topk' else 1
  y = np.zeros_like(x)
  kept = np.zeros(x.shape[:2] + (k,), bool)
  for b in range(x.shape[0]):
    used = np.zeros(E, int)
    for t in range(x.shape[1]):
      if not valid[b, t]:
        continue
      p = _softmax(x[b, t] @ _np(moe, 'router'))
      idx = np.argsort(-p, kind='stable')[:k]
      w = p[idx] / (p[idx].sum() if k > 1 and cfg.moe.normalize_top_k else 1.0)
      for j, (e, wi) in enumerate(zip(idx, w)):
        if used[e] < cap:
          y[b, t] += wi * _np_expert(moe, cfg, e, x[b, t])
          kept[b, t, j] = True
        used[e] += 1
  return y, kept


def _loop_soft(moe, cfg, x, valid):
  phi = _np(moe, 'phi')
  s_per = phi.shape[-1]
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    toks = [t for t in range(x.shape[1]) if valid[b, t]]
    logits = np.einsum('td,des->tes', x[b], phi)
    out = np.zeros((E, s_per, D))
    for e in range(E):
      for s in range(s_per):
        w = _softmax(logits[toks, e, s])
        out[e, s] = _np_expert(moe, cfg, e, w @ x[b, toks])
    for t in toks:
      c = _softmax(logits[t].ravel()).reshape(E, s_per)
      y[b, t] = np.einsum('es,esd->d', c, out)
  return y


@functools.partial(nnx.jit, static_argnames=('deterministic',))
def _apply(moe, x, mask=None, token_ids=None, deterministic=True):
  # Jitted: one compilation per shape instead of one per primitive op keeps the suite fast.
  return moe(x, mask=mask, token_ids=token_ids, deterministic=deterministic)


def _close(actual, ref):
  chex.assert_trees_all_close(np.asarray(actual), ref.astype(np.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('router', ['topk', 'switch'])
@pytest.mark.parametrize('gated,bias,act', [(True, False, 'silu'), (False, True, 'gelu')])
def test_one_expert_equals_dense_ffn(router, gated, bias, act):
  cfg = _cfg(gated, bias, act, num_experts=1, top_k=1, router=router, capacity_factor=1.0)
  ffn = _randomise(FeedForward(cfg, rngs=nnx.Rngs(0)))
  moe = MoE(cfg, rngs=nnx.Rngs(1))
  for name in ('wi', 'wi_gate', 'wi_up', 'wo', 'bi', 'bi_gate', 'bi_up', 'bo'):
    if hasattr(ffn, name):
      getattr(moe, name)[...] = getattr(ffn, name)[...][None]
  x = jnp.asarray(_x(), jnp.float32)
  y, aux = _apply(moe, x)
  chex.assert_trees_all_close(y, nnx.jit(lambda f, x: f(x))(ffn, x), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux['load_balance_loss'], 1.0, rtol=1e-6)


@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('gated,bias,act', [(True, False, 'silu'), (False, True, 'relu')])
def test_topk_matches_per_token_loop(normalize, gated, bias, act):
  cfg = _cfg(gated, bias, act, normalize_top_k=normalize)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = _x()
  valid = np.ones((B, T), bool)
  valid[1, 5:] = False
  y, _ = _apply(moe, jnp.asarray(x, jnp.float32), mask=jnp.asarray(valid))
  _close(y, _loop_topk(moe, cfg, x, valid))


def test_topk_matches_hf_mixtral_block_and_aux_loss():
  torch = pytest.importorskip('torch')
  mixtral = pytest.importorskip('transformers.models.mixtral.modeling_mixtral')
  from transformers import MixtralConfig
  hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                         num_experts_per_tok=2, hidden_act='silu', router_jitter_noise=0.0)
  block = mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
  cfg = _cfg()
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
  with torch.no_grad():
    block.gate.weight.copy_(t(moe.router[...]).T)
    block.experts.gate_up_proj.copy_(torch.cat(
        [t(moe.wi_gate[...]).transpose(1, 2), t(moe.wi_up[...]).transpose(1, 2)], dim=1))
    block.experts.down_proj.copy_(t(moe.wo[...]).transpose(1, 2))
    x = _x(3).astype(np.float32)
    ref = block(t(x)).numpy()
    logits = block.gate(t(x).reshape(-1, D))[0]
    hf_loss = mixtral.load_balancing_loss_func((logits,), E, 2).item()
  y, aux = _apply(moe, jnp.asarray(x))
  chex.assert_trees_all_close(y, ref, atol=1e-5, rtol=1e-5)
  # HF counts each token's k assignments (its f sums to k): k times our per-assignment loss.
  np.testing.assert_allclose(2 * float(aux['load_balance_loss']), hf_loss, rtol=1e-5)


def test_switch_matches_loop_and_drops_over_capacity():
  cfg = _cfg(router='switch', capacity_factor=0.5)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  cap = moe.capacity(T)
  assert cap == math.ceil(0.5 * T / E) == 1
  x = _x()
  valid = np.ones((B, T), bool)
  ref = _loop_capacity(moe, cfg, x, valid, cap)[0]
  dropped = np.all(ref == 0.0, axis=-1)
  assert dropped.sum() >= 4  # at most E * cap = 4 of each row's 8 tokens are served
  y, _ = _apply(moe, jnp.asarray(x, jnp.float32))
  _close(y, ref)
  np.testing.assert_array_equal(np.asarray(y)[dropped], 0.0)


def test_switch_padding_takes_no_capacity():
  cfg = _cfg(router='switch', capacity_factor=1.0)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = _x(4)
  valid = np.ones((B, T), bool)
  valid[:, :3] = False  # leading padding would claim slots first if it counted
  y, _ = _apply(moe, jnp.asarray(x, jnp.float32), mask=jnp.asarray(valid))
  _close(y, _loop_capacity(moe, cfg, x, valid, moe.capacity(T))[0])
  x2 = x.copy()
  x2[~valid] = 100.0 * _x(5)[~valid]
  y2, _ = _apply(moe, jnp.asarray(x2, jnp.float32), mask=jnp.asarray(valid))
  chex.assert_trees_all_close(y2, y, atol=1e-6)


def test_hash_routing_matches_loop_and_needs_token_ids():
  cfg = _cfg(gated=False, bias=True, act='gelu', router='hash')
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  assert not hasattr(moe, 'router')
  x = _x()
  ids = np.random.default_rng(1).integers(0, 100, (B, T))
  ref = np.stack([np.stack([_np_expert(moe, cfg, ids[b, t] % E, x[b, t]) for t in range(T)])
                  for b in range(B)])
  y, aux = _apply(moe, jnp.asarray(x, jnp.float32), token_ids=jnp.asarray(ids))
  _close(y, ref)
  assert float(aux['load_balance_loss']) == 0.0
  with pytest.raises(ValueError, match='token_ids'):
    _apply(moe, jnp.asarray(x, jnp.float32))


def test_soft_moe_is_refused_in_causal_stacks():
  with pytest.raises(ConfigError, match='model.moe.router'):
    MoE(_cfg(router='soft').replace(family='decoder'), rngs=nnx.Rngs(0))
  MoE(_cfg(router='soft').replace(family='decoder'), causal=False, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('slots', [1, 3])
def test_soft_moe_matches_loop(slots):
  cfg = _cfg(router='soft', slots_per_expert=slots)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  assert moe.phi.shape == (D, E, slots)
  x = _x()
  valid = np.ones((B, T), bool)
  valid[0, 6:] = False
  y, _ = _apply(moe, jnp.asarray(x, jnp.float32), mask=jnp.asarray(valid))
  _close(y, _loop_soft(moe, cfg, x, valid))


def _hand_moe(logits, **moe_kw):
  """An MoE whose router logits for token t of x = eye(D)[:T] are exactly logits[t]."""
  moe = MoE(_cfg(**moe_kw), rngs=nnx.Rngs(0))
  w = np.zeros((D, E), np.float32)
  w[:len(logits)] = logits
  moe.router[...] = jnp.asarray(w)
  return moe, jnp.asarray(np.eye(D)[None, :len(logits)], jnp.float32)


def test_load_balance_and_z_loss_on_hand_examples():
  # Uniform routing (all logits 0): f and P uniform -> 1; logsumexp = log E.
  moe, x = _hand_moe(np.zeros((4, E)), top_k=1)
  _, aux = _apply(moe, x)
  np.testing.assert_allclose(aux['load_balance_loss'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux['router_z_loss'], math.log(E) ** 2, rtol=1e-6)
  # Perfectly balanced confident routing: token t -> expert t.
  moe, x = _hand_moe(10.0 * np.eye(E), top_k=1)
  np.testing.assert_allclose(_apply(moe, x)[1]['load_balance_loss'], 1.0, rtol=1e-6)
  # Collapse: every token prefers expert 0 -> f = (1, 0, 0, 0), P_0 = e^10 / (e^10 + 3).
  logits = np.zeros((4, E))
  logits[:, 0] = 10.0
  for router in ('topk', 'switch'):
    moe, x = _hand_moe(logits, top_k=1, router=router)
    _, aux = _apply(moe, x)
    p0 = math.exp(10) / (math.exp(10) + 3)
    np.testing.assert_allclose(aux['load_balance_loss'], E * p0, rtol=1e-6)
    np.testing.assert_allclose(aux['router_z_loss'], math.log(math.exp(10) + 3) ** 2,
                               rtol=1e-6)
  # top-2 on two tokens: f counts both assignments, normalised by k * N.
  logits = np.array([[3.0, 2.0, 0.0, -1.0], [0.0, 1.0, 2.5, 0.5]])
  moe, x = _hand_moe(logits, top_k=2)
  p = _softmax(logits)
  f = np.array([1, 2, 1, 0]) / 4.0  # token 0 -> {0, 1}, token 1 -> {2, 1}
  np.testing.assert_allclose(_apply(moe, x)[1]['load_balance_loss'], E * np.sum(f * p.mean(0)),
                             rtol=1e-6)


def test_padding_is_excluded_from_losses():
  cfg = _cfg()
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = jnp.asarray(_x(6, (1, T, D)), jnp.float32)
  valid = jnp.arange(T)[None] < 5
  y_m, aux_m = _apply(moe, x, mask=valid)
  y_s, aux_s = _apply(moe, x[:, :5])
  chex.assert_trees_all_close(aux_m, aux_s, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(y_m[:, :5], y_s, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y_m[:, 5:]), 0.0)


def test_top_k_above_num_experts_is_rejected():
  with pytest.raises(ConfigError, match='model.moe.top_k'):
    ModelConfig.from_dict({'moe': {'num_experts': 2, 'top_k': 3}})
  with pytest.raises(ConfigError, match='model.moe.num_experts'):
    MoE(ModelConfig(), rngs=nnx.Rngs(0))


def test_expert_axis_first_and_moe_layer_schedule():
  moe = MoE(_cfg(), rngs=nnx.Rngs(0))
  meta = lambda name: getattr(moe, name).get_metadata()['out_sharding']
  assert moe.wi_gate.shape == (E, D, F) and meta('wi_gate') == ('expert', 'embed', 'mlp')
  assert moe.wo.shape == (E, F, D) and meta('wo') == ('expert', 'mlp', 'embed')
  assert moe.router.shape == (D, E)
  # Each expert is initialised like a dense FFN (xavier fans D and F, not E * D), independently.
  xav = MoE(_cfg().replace(init='xavier'), rngs=nnx.Rngs(0))
  w = np.abs(np.asarray(xav.wi_up[...]))
  limit = math.sqrt(6 / (D + F))
  assert w.max() <= limit and w.max() > 0.9 * limit
  assert not np.allclose(w[0], w[1])
  cfg = _cfg(every=2)
  assert [is_moe_layer(cfg, i) for i in range(4)] == [False, True, False, True]
  assert not is_moe_layer(ModelConfig(), 0)


def test_jit_matches_eager():
  cfg = _cfg(router='switch', capacity_factor=0.75)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)))
  x = jnp.asarray(_x(), jnp.float32)
  mask = jnp.arange(T)[None] < jnp.array([[T], [5]])
  chex.assert_trees_all_close(_apply(moe, x, mask=mask), moe(x, mask=mask), atol=1e-6)


@pytest.mark.parametrize('router', ['topk', 'switch', 'hash', 'soft'])
def test_grads_are_finite(router):
  cfg = _cfg(router=router, capacity_factor=1.0)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(0)), std=0.2)
  x = jnp.asarray(_x(), jnp.float32)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, T)))
  mask = jnp.arange(T)[None] < jnp.array([[T], [5]])

  @nnx.jit
  def grads(m, x):
    def loss(m):
      y, aux = m(x, mask=mask, token_ids=ids)
      return jnp.mean(y ** 2) + aux['load_balance_loss'] + aux['router_z_loss']
    return nnx.grad(loss)(m)

  g = grads(moe, x)
  chex.assert_tree_all_finite(jax.tree.leaves(g))
  assert float(jnp.abs(g.wo[...]).max()) > 0.0
  gate_param = {'topk': 'router', 'switch': 'router', 'soft': 'phi'}.get(router)
  if gate_param:
    assert float(jnp.abs(getattr(g, gate_param)[...]).max()) > 0.0


def test_jitter_only_in_training():
  cfg = _cfg(router='switch', capacity_factor=2.0, jitter=0.5)
  moe = _randomise(MoE(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
  ref = _randomise(MoE(_cfg(router='switch', capacity_factor=2.0), rngs=nnx.Rngs(0)))
  x = jnp.asarray(_x(), jnp.float32)
  chex.assert_trees_all_close(_apply(moe, x)[0], _apply(ref, x)[0])
  assert not np.allclose(_apply(moe, x, deterministic=False)[0], _apply(ref, x)[0])
