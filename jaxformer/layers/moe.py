"""Mixture of experts as a drop-in FFN (CATALOG D5).

Every expert is the FFN of `jaxformer.layers.ffn` (gated or plain per `cfg.ffn`), with weights
stacked on a leading expert axis: wi_gate / wi_up / wi [E, D, F] ('expert', 'embed', 'mlp'),
wo [E, F, D] ('expert', 'mlp', 'embed'), biases bi* [E, F], bo [E, D]. Routers (`cfg.moe.router`):

topk   (Shazeer et al. 2017; GShard; Mixtral): logits r = x W_r ([D, E], no bias), p = softmax(r)
       in float32, keep the top-k p and renormalise them when cfg.moe.normalize_top_k:
       y = sum_{e in topk} w_e FFN_e(x); exactly HF MixtralSparseMoeBlock with the dropless
       dispatchers. Default dispatch 'dense': all experts run on all tokens and the combine
       weights zero the others (E/k times a sparse kernel's cost); 'ragged' is the sparse form.
switch (Fedus et al. 2021): top-1, w = p_e. Default dispatch 'capacity' with C =
       ceil(capacity_factor * T / E) slots per expert per group (group = one batch row);
       tokens claim slots in position order and those over capacity are dropped: the MoE
       outputs 0 for them (the residual carries them). Earlier tokens win slots, so it is
       causal; but capacity depends on the T of each call, so KV-cached decoding (T = 1, never
       drops) equals the full forward only when nothing was dropped there.
hash   (Roller et al. 2021): expert = token_id % E, weight 1, dropless; needs `token_ids`.
soft   (Puigcerver et al. 2023): logits X Phi, Phi [D, E, S] (S = slots_per_expert);
       dispatch = softmax over tokens per slot, slot inputs X~ = D^T X [E, B, S, D];
       combine = softmax over all E*S slots per token; y = C f(X~). (The paper's optional
       l2-normalisation of X and Phi for large D is not applied.) Not causal: refused for
       causal stacks (`causal`, default cfg.is_causal).

Aux losses, returned unweighted (the trainer multiplies by cfg.moe.load_balance_weight and
cfg.moe.z_loss_weight):
  load_balance_loss = E * sum_e f_e P_e  (Switch eq. 4-6), f_e = fraction of the k*N token
      assignments that chose e (before capacity), P_e = mean router probability of e over the N
      valid tokens of the whole batch. Uniform routing gives 1. HF Mixtral's
      `load_balancing_loss_func` counts assignments per token (its f sums to k), so it equals k
      times this value for one layer.
  router_z_loss = mean over valid tokens of logsumexp(r)^2  (ST-MoE, Zoph et al. 2022).
Both are 0 for hash and soft routing (no learned top-k choice to balance). Both are computed
here, on the global [B, T] arrays, whatever the dispatcher and however it is sharded.

Dispatch (`cfg.moe.dispatch`, `jaxformer.layers.moe_dispatch`): topk, switch and hash produce
a `Routing` (K expert ids and weights per token) that any dispatcher serves: 'dense',
'capacity' (capacity_factor * K * T / E slots, earlier tokens win) or 'ragged' (dropless
`ragged_dot`); 'auto' = dense for topk and hash, capacity for switch. With a mesh 'expert' axis
> 1, capacity and ragged run as expert parallelism (shard_map + all_to_all).

`mask` [B, T] (True = real token): padding takes no capacity, counts in no loss, and gets output 0.
Jitter (Switch): when cfg.moe.jitter > 0 and not deterministic, the router input (only) is
multiplied by U(1 - jitter, 1 + jitter) noise from the 'dropout' stream.
Einsum letters: B batch, T length, D model dim, F ffn dim, E experts, C capacity, S slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ACTIVATIONS, DISPATCHES, ModelConfig, check_choice, fail
from jaxformer.layers.base import make_init, param, residual_init, zeros
from jaxformer.layers import moe_dispatch
from jaxformer.layers.ffn import activation, ffn_weight_specs
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

AUX_KEYS = ('load_balance_loss', 'router_z_loss')


def is_moe_layer(cfg: ModelConfig, layer_index: int) -> bool:
  """Whether layer `layer_index` uses an MoE instead of the FFN (every `cfg.moe.every`-th)."""
  m = cfg.moe
  return m.num_experts > 0 and layer_index % m.every == m.every - 1


def _stacked(init, num: int):
  """An initializer for [num, ...] that applies `init` to each [...] slice (own fan-in/out)."""

  def f(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num)
    return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

  return f


class MoE(nnx.Module):
  """`__call__(x [B,T,D], *, mask=None, token_ids=None, deterministic=True) -> (y, aux)`.

  Params: `router` [D, E] ('embed', None) for topk/switch (HF Mixtral gate.weight transposed),
  `phi` [D, E, S] ('embed', 'expert', None) for soft, none for hash; expert weights as in the
  module docstring (HF Mixtral experts.gate_up_proj[e] = [wi_gate[e].T; wi_up[e].T],
  experts.down_proj[e] = wo[e].T).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_layers: int | None = None,
               causal: bool | None = None):
    m = cfg.moe
    if m.num_experts <= 0:
      fail('model.moe.num_experts', m.num_experts, 'must be > 0 to build an MoE layer')
    if m.router == 'soft' and (cfg.is_causal if causal is None else causal):
      fail('model.moe.router', m.router,
           'Soft MoE mixes all tokens of a sequence into every slot, so it cannot serve a causal '
           '(decoder) stack; use topk, switch or hash there (pass causal=False for an encoder)')
    if m.router == 'soft' and m.slots_per_expert <= 0:
      fail('model.moe.slots_per_expert', m.slots_per_expert, 'must be a positive integer')
    self.router_kind = m.router
    check_choice('model.moe.dispatch', m.dispatch, DISPATCHES)
    if m.router == 'soft' and m.dispatch != 'auto':
      fail('model.moe.dispatch', m.dispatch, "must be 'auto' for router 'soft'")
    self.dispatch = (m.dispatch if m.dispatch != 'auto' else
                     'capacity' if m.router == 'switch' else 'dense')
    self.num_experts = e = m.num_experts
    self.top_k = m.top_k if m.router == 'topk' else 1
    self.normalize_top_k = m.normalize_top_k
    self.capacity_factor = m.capacity_factor
    self.jitter = m.jitter
    self.gated = cfg.ffn.gated
    check_choice('model.ffn.activation', cfg.ffn.activation, ACTIVATIONS)
    self.activation = cfg.ffn.activation
    self.dtype = cfg.compute_dtype
    d, f = cfg.d_model, cfg.ffn_hidden_dim
    init = make_init(cfg.init, cfg.init_std)
    if m.router in ('topk', 'switch'):
      self.router = param(rngs, init, (d, e), ('embed', None), cfg.params_dtype)
    elif m.router == 'soft':
      self.phi = param(rngs, make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2)),
                       (d, e, m.slots_per_expert), ('embed', 'expert', None), cfg.params_dtype)
    inits = {
        'in': init,
        'out': residual_init(cfg.init, cfg.init_std, num_layers or cfg.num_layers,
                             cfg.scaled_residual_init),
        'in_bias': zeros, 'out_bias': zeros,
    }
    shapes = {'in': (d, f), 'out': (f, d), 'in_bias': (f,), 'out_bias': (d,)}
    for name, (role, names) in ffn_weight_specs(cfg).items():
      # An expert's bias [E, F] has two axes: the role keeps weight decay off it.
      setattr(self, name, param(rngs, _stacked(inits[role], e), (e,) + shapes[role],
                                ('expert',) + names, cfg.params_dtype,
                                role='bias' if role.endswith('_bias') else None))
    self.dropout = nnx.Dropout(cfg.ffn.dropout, rngs=rngs if cfg.ffn.dropout > 0 else None)
    use_jitter = m.jitter > 0 and m.router in ('topk', 'switch')
    self.jitter_rngs = rngs['dropout'].fork() if use_jitter else nnx.data(None)

  # ------------------------------------------------------------------ experts
  def _experts(self, deterministic: bool) -> moe_dispatch.Experts:
    w = {}
    for name in ('wi_gate', 'wi_up', 'wi', 'wo', 'bi_gate', 'bi_up', 'bi', 'bo'):
      v = getattr(self, name, None)
      if v is not None:
        w[name] = v[...].astype(self.dtype)
    return moe_dispatch.Experts(w, activation(self.activation), self.gated,
                                lambda h: self.dropout(h, deterministic=deterministic))

  def _dispatch(self, x, routing, deterministic):
    # Expert dropout draws its masks from NNX streams, which cannot enter shard_map.
    ep = deterministic or self.dropout.rate == 0
    return moe_dispatch.run(self.dispatch, x, routing, self._experts(deterministic),
                            self.capacity_factor, expert_parallel=ep)

  # ------------------------------------------------------------------ routing
  def _router_logits(self, x, deterministic):
    x32 = x.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      x32 = x32 * jax.random.uniform(self.jitter_rngs(), x32.shape, jnp.float32,
                                     1.0 - self.jitter, 1.0 + self.jitter)
    logits = jnp.einsum('BTD,DE->BTE', x32, self.router[...].astype(jnp.float32))
    return constrain(logits, R.ROUTER_LOGITS)

  def capacity(self, num_tokens: int) -> int:
    """Capacity-dispatch slots per expert per group: ceil(capacity_factor * k * T / E), <= T."""
    return moe_dispatch.capacity_slots(self.capacity_factor, self.top_k, num_tokens,
                                       self.num_experts)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               token_ids: jax.Array | None = None, deterministic: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, _ = x.shape
    valid = (jnp.ones((b, t), bool) if mask is None else mask.astype(bool))
    vf = valid.astype(jnp.float32)
    xc = x.astype(self.dtype)
    zero = jnp.zeros((), jnp.float32)
    if self.router_kind == 'soft':
      return self._soft(xc, valid, deterministic), {k: zero for k in AUX_KEYS}
    if self.router_kind == 'hash':
      if token_ids is None:
        raise ValueError("MoE router 'hash' (model.moe.router) routes by token id: pass "
                         'token_ids [B, T] to MoE.__call__')
      routing = moe_dispatch.Routing((token_ids % self.num_experts)[..., None],
                                     jnp.ones((b, t, 1), jnp.float32), valid)
      y = self._dispatch(xc, routing, deterministic)
      return y.astype(self.dtype), {k: zero for k in AUX_KEYS}

    logits = self._router_logits(x, deterministic)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.router_kind == 'topk':
      top_p, top_i = jax.lax.top_k(probs, self.top_k)
      if self.normalize_top_k:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    else:  # switch: top-1 with the raw probability as its weight
      top_i = jnp.argmax(probs, axis=-1)[..., None]
      top_p = jnp.max(probs, axis=-1)[..., None]
    y = self._dispatch(xc, moe_dispatch.Routing(top_i, top_p, valid), deterministic)
    # Fraction of the k assignments of each token that chose e (before any capacity).
    assigned = jnp.sum(jax.nn.one_hot(top_i, self.num_experts), axis=2) / self.top_k
    n = jnp.maximum(jnp.sum(vf), 1.0)
    f = jnp.einsum('BTE,BT->E', assigned, vf) / n
    p = jnp.einsum('BTE,BT->E', probs, vf) / n
    z = jax.nn.logsumexp(logits, axis=-1)
    aux = {'load_balance_loss': self.num_experts * jnp.sum(f * p),
           'router_z_loss': jnp.sum(jnp.square(z) * vf) / n}
    return y.astype(self.dtype), aux

  def _soft(self, x, valid, deterministic):
    b, t, _ = x.shape
    phi = self.phi[...].astype(jnp.float32)
    _, e, s = phi.shape
    logits = jnp.einsum('BTD,DES->BTES', x.astype(jnp.float32), phi)
    # Padding never feeds a slot; an all-padding row gets a uniform (harmless) dispatch.
    masked = jnp.where(valid[:, :, None, None], logits, jnp.finfo(jnp.float32).min)
    dispatch = jax.nn.softmax(masked, axis=1)
    combine = jax.nn.softmax(logits.reshape(b, t, e * s), axis=-1).reshape(b, t, e, s)
    combine = combine * valid[:, :, None, None]
    slots = jnp.einsum('BTES,BTD->EBSD', dispatch.astype(x.dtype), x)
    slots = constrain(slots, R.EXPERT_TOKENS)
    out = self._experts(deterministic).buffers(slots)
    out = constrain(out, R.EXPERT_TOKENS)
    return jnp.einsum('BTES,EBSD->BTD', combine.astype(x.dtype), out).astype(self.dtype)
