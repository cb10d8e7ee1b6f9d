"""Mixture of experts as a drop-in FFN (CATALOG D5).

Every expert is the FFN of `jaxformer.layers.ffn` (gated or plain per `cfg.ffn`), with weights
stacked on a leading expert axis: wi_gate / wi_up / wi [E, D, F] ('expert', 'embed', 'mlp'),
wo [E, F, D] ('expert', 'mlp', 'embed'), biases bi* [E, F], bo [E, D]. Routers (`cfg.moe.router`):

topk   (Shazeer et al. 2017; GShard; Mixtral): logits r = x W_r ([D, E], no bias), p = softmax(r)
       in float32, keep the top-k p and renormalise them when cfg.moe.normalize_top_k:
       y = sum_{e in topk} w_e FFN_e(x). Dropless: every token reaches its k experts (no
       capacity), exactly HF MixtralSparseMoeBlock. Computed densely: all experts run on all
       tokens ('BTD,EDF->BTEF') and the combine weights [B, T, E] zero the others, so the cost
       is E/k times a sparse kernel's but memory stays linear in T and the expert axis shards.
switch (Fedus et al. 2021): top-1, w = p_e. Capacity C = ceil(capacity_factor * T / E) tokens
       per expert per group (group = one batch row); tokens claim slots in position order and
       those over capacity are dropped: the MoE outputs 0 for them (the residual carries them).
       Dense dispatch [B, T, E, C] (0/1) and combine (dispatch * w) tensors:
       expert_in = einsum('BTEC,BTD->EBCD'), y = einsum('BTEC,EBCD->BTD').
       Earlier tokens win slots, so it is causal; but capacity depends on the T of each call,
       so KV-cached decoding (T = 1, never drops) equals the full forward only when nothing
       was dropped there (e.g. capacity_factor >= E).
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
Both are 0 for hash and soft routing (no learned top-k choice to balance).

`mask` [B, T] (True = real token): padding takes no capacity, counts in no loss, and gets output 0.
Jitter (Switch): when cfg.moe.jitter > 0 and not deterministic, the router input (only) is
multiplied by U(1 - jitter, 1 + jitter) noise from the 'dropout' stream.
Einsum letters: B batch, T length, D model dim, F ffn dim, E experts, C capacity, S slots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ACTIVATIONS, ModelConfig, check_choice, fail
from jaxformer.layers.base import make_init, param, residual_init, zeros
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain
from jaxformer.layers.ffn import activation, ffn_weight_specs

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
      setattr(self, name, param(rngs, _stacked(inits[role], e), (e,) + shapes[role],
                                ('expert',) + names, cfg.params_dtype))
    self.dropout = nnx.Dropout(cfg.ffn.dropout, rngs=rngs if cfg.ffn.dropout > 0 else None)
    use_jitter = m.jitter > 0 and m.router in ('topk', 'switch')
    self.jitter_rngs = rngs['dropout'].fork() if use_jitter else nnx.data(None)

  # ------------------------------------------------------------------ experts
  def _w(self, name):
    w = getattr(self, name, None)
    return None if w is None else w[...].astype(self.dtype)

  def _experts(self, x, combine=None, *, deterministic):
    """Expert FFNs. x [E, B, C, D] -> [E, B, C, D]; or, with combine [B, T, E], the dense
    dropless form: x [B, T, D] -> sum_e combine_e FFN_e(x) [B, T, D]."""
    dense = combine is not None
    spec_in, spec_out = (('BTD,EDF->BTEF', 'BTEF,EFD->BTD') if dense else
                         ('EBCD,EDF->EBCF', 'EBCF,EFD->EBCD'))
    names = R.DENSE_EXPERT_HIDDEN if dense else R.EXPERT_HIDDEN

    def proj(w, b):
      y = jnp.einsum(spec_in, x, self._w(w))
      bias = self._w(b)
      if bias is not None:
        y = y + (bias if dense else bias[:, None, None, :])
      return y

    act = activation(self.activation)
    if self.gated:
      h = act(proj('wi_gate', 'bi_gate')) * proj('wi_up', 'bi_up')
    else:
      h = act(proj('wi', 'bi'))
    h = constrain(h, names)
    h = self.dropout(h, deterministic=deterministic)
    bo = self._w('bo')
    if dense:
      h = h * combine.astype(h.dtype)[..., None]
      y = jnp.einsum(spec_out, h, self._w('wo'))
      if bo is not None:
        y = y + jnp.einsum('BTE,ED->BTD', combine.astype(y.dtype), bo)
      return y
    y = jnp.einsum(spec_out, h, self._w('wo'))
    return y if bo is None else y + bo[:, None, None, :]

  # ------------------------------------------------------------------ routing
  def _router_logits(self, x, deterministic):
    x32 = x.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      x32 = x32 * jax.random.uniform(self.jitter_rngs(), x32.shape, jnp.float32,
                                     1.0 - self.jitter, 1.0 + self.jitter)
    logits = jnp.einsum('BTD,DE->BTE', x32, self.router[...].astype(jnp.float32))
    return constrain(logits, R.ROUTER_LOGITS)

  def capacity(self, num_tokens: int) -> int:
    """Switch capacity per expert per group: ceil(capacity_factor * T / E), at most T."""
    return max(1, min(num_tokens,
                      math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

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
      combine = jax.nn.one_hot(token_ids % self.num_experts, self.num_experts) * vf[..., None]
      y = self._experts(xc, combine, deterministic=deterministic)
      return y.astype(self.dtype), {k: zero for k in AUX_KEYS}

    logits = self._router_logits(x, deterministic)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.router_kind == 'topk':
      top_p, top_i = jax.lax.top_k(probs, self.top_k)
      if self.normalize_top_k:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
      chosen = jax.nn.one_hot(top_i, self.num_experts)            # [B, T, k, E]
      combine = jnp.einsum('BTKE,BTK->BTE', chosen, top_p) * vf[..., None]
      y = self._experts(xc, combine, deterministic=deterministic)
      assigned = jnp.sum(chosen, axis=2) / self.top_k             # [B, T, E]
    else:
      y, assigned = self._switch(xc, probs, vf, deterministic)
    n = jnp.maximum(jnp.sum(vf), 1.0)
    f = jnp.einsum('BTE,BT->E', assigned, vf) / n
    p = jnp.einsum('BTE,BT->E', probs, vf) / n
    z = jax.nn.logsumexp(logits, axis=-1)
    aux = {'load_balance_loss': self.num_experts * jnp.sum(f * p),
           'router_z_loss': jnp.sum(jnp.square(z) * vf) / n}
    return y.astype(self.dtype), aux

  def _switch(self, x, probs, vf, deterministic):
    _, t, _ = x.shape
    cap = self.capacity(t)
    chosen = jax.nn.one_hot(jnp.argmax(probs, axis=-1), self.num_experts) * vf[..., None]
    gate = jnp.max(probs, axis=-1)                                   # [B, T]
    # Slot of each token within its expert's buffer, in position order; padding takes none.
    slot = (jnp.cumsum(chosen, axis=1) - 1.0) * chosen             # [B, T, E]
    kept = chosen * (slot < cap)
    dispatch = kept[..., None] * jax.nn.one_hot(slot.astype(jnp.int32), cap)  # [B, T, E, C]
    combine = dispatch * gate[:, :, None, None]
    expert_in = jnp.einsum('BTEC,BTD->EBCD', dispatch.astype(x.dtype), x)
    expert_in = constrain(expert_in, R.EXPERT_TOKENS)
    expert_out = self._experts(expert_in, deterministic=deterministic)
    expert_out = constrain(expert_out, R.EXPERT_TOKENS)
    y = jnp.einsum('BTEC,EBCD->BTD', combine.astype(x.dtype), expert_out)
    return y, chosen

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
    out = self._experts(slots, deterministic=deterministic)
    out = constrain(out, R.EXPERT_TOKENS)
    return jnp.einsum('BTES,EBSD->BTD', combine.astype(x.dtype), out).astype(self.dtype)
