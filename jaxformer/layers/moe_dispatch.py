"""MoE dispatchers: how routed tokens reach their experts (CATALOG D5; `model.moe.dispatch`).

A router (`jaxformer.layers.moe`) turns x [B, T, D] into a `Routing`: for every token its K
assignments, expert ids [B, T, K] and combine weights [B, T, K], plus the padding mask. Every
dispatcher computes the same function of a Routing,

    y_t = sum_k w_tk FFN_{e_tk}(x_t),

and differs only in cost and in what happens when an expert is oversubscribed:

dense     every expert runs on every token, y = sum_e c_e FFN_e(x) with c [B, T, E] the
          scattered weights ('BTD,EDF->BTEF'): E/K times the sparse FLOPs; the oracle.
capacity  GShard (Lepikhin et al. 2020) / Switch (Fedus et al. 2021): each expert has C slots
          per group (group = one batch row), C = ceil(capacity_factor * K * T / E), at most T.
          Assignments claim slots in position order (token t's K choices, best first, before
          token t + 1's): earlier tokens win, so it stays causal. An assignment over capacity
          is dropped (adds 0; a token with all K dropped outputs 0, the residual carries it).
          Padding claims no slot. Dense 0/1 dispatch [B, T, E, C] and combine (dispatch * w):
          expert_in = einsum('BTEC,BTD->EBCD'), y = einsum('BTEC,EBCD->BTD').
ragged    dropless and sparse: the N K assignments are sorted by expert (stable), the gathered
          rows xs [N K, D] go through a grouped matmul (`grouped_matmul`: xs, W [E, D, F],
          group_sizes [E]), are unsorted and summed with their weights. The grouped matmul is
          `jax.lax.ragged_dot` on GPU and TPU; XLA:CPU expands ragged_dot into E dense
          products (no saving at all), so on CPU it is a blocked grouped matmul
          (`blocked_grouped_matmul`, MegaBlocks-style: each group padded to whole blocks of
          rows, every block one expert's matmul), which costs the sparse FLOPs plus padding.

Expert parallelism (`expert_parallel`): when the active layout shards the experts' 'expert'
dimension over mesh axes of total size n > 1, capacity and ragged run under `jax.shard_map`
(GShard's recipe). Tokens are split over the batch axes and the expert axes together (whole
rows, so capacity groups are unchanged); each device routes its rows, `all_to_all` over the
expert axes sends every buffer to the device holding its expert, the device runs its E / n
experts with its own weight shards (never gathered over 'expert'), and a second all_to_all
brings the outputs back to the tokens' devices. Capacity sends [E, B_local, C, D] (split on
E, concatenated on rows). Ragged sends a fixed [n, N_local K, D] buffer (row j for device j,
sized for the worst case that every local assignment picks one device: dropless, at n times
the minimal buffer; `ragged_all_to_all` would size it exactly but has no CPU lowering), with the
receiving local expert id per row (E / n marks an empty row); the receiver sorts by local
expert and runs `ragged_dot` on its shard. The router and its losses stay outside, on the
global arrays. Falls back to the XLA-sharded form (same values) when the rows do not divide
over batch x expert shards or when expert dropout is active (masks are drawn outside).
Letters: B batch, T length, D model, F ffn, E experts, K choices, C capacity, A assignments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import active_layout, constrain

P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Routing:
  """Per token K assignments: `expert` [B, T, K] int, `weight` [B, T, K] and `valid` [B, T]
  bool; every dispatcher masks padding (valid False) itself: no slot, no output."""
  expert: jax.Array
  weight: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class Experts:
  """E stacked FFNs: `w` maps wi_gate/wi_up/wi/wo/bi*/bo to arrays with a leading E axis (in
  compute dtype); `dropout(h)` is applied to the hidden activations; `sharded` turns on the
  logical sharding constraints (off inside shard_map)."""
  w: dict[str, jax.Array]
  act: Callable[[jax.Array], jax.Array]
  gated: bool
  dropout: Callable[[jax.Array], jax.Array] = lambda h: h
  sharded: bool = True

  @property
  def num(self) -> int:
    return self.w['wo'].shape[0]

  def _hidden(self, proj):
    if self.gated:
      return self.act(proj('wi_gate', 'bi_gate')) * proj('wi_up', 'bi_up')
    return self.act(proj('wi', 'bi'))

  def dense(self, x, combine):
    """x [B, T, D], combine [B, T, E] -> sum_e combine_e FFN_e(x) [B, T, D]."""
    def proj(w, b):
      y = jnp.einsum('BTD,EDF->BTEF', x, self.w[w])
      return y if self.w.get(b) is None else y + self.w[b]

    h = self._hidden(proj)
    if self.sharded:
      h = constrain(h, R.DENSE_EXPERT_HIDDEN)
    h = self.dropout(h)
    h = h * combine.astype(h.dtype)[..., None]
    y = jnp.einsum('BTEF,EFD->BTD', h, self.w['wo'])
    bo = self.w.get('bo')
    if bo is not None:
      y = y + jnp.einsum('BTE,ED->BTD', combine.astype(y.dtype), bo)
    return y

  def buffers(self, x):
    """Per-expert token buffers x [E, G, C, D] -> [E, G, C, D]."""
    def proj(w, b):
      y = jnp.einsum('EBCD,EDF->EBCF', x, self.w[w])
      return y if self.w.get(b) is None else y + self.w[b][:, None, None, :]

    h = self._hidden(proj)
    if self.sharded:
      h = constrain(h, R.EXPERT_HIDDEN)
    h = self.dropout(h)
    y = jnp.einsum('EBCF,EFD->EBCD', h, self.w['wo'])
    bo = self.w.get('bo')
    return y if bo is None else y + bo[:, None, None, :]

  def rows(self, xs, group_sizes, expert_ids):
    """Rows xs [A, D] sorted by expert, `group_sizes` [E] rows per expert (rows past their sum
    are left to ragged_dot and must be ignored by the caller), `expert_ids` [A] -> [A, D]."""
    ids = jnp.minimum(expert_ids, self.num - 1)  # only for bias lookups of ignored rows

    def proj(w, b):
      y = grouped_matmul(xs, self.w[w], group_sizes)
      return y if self.w.get(b) is None else y + self.w[b][ids]

    h = self.dropout(self._hidden(proj))
    y = grouped_matmul(h, self.w['wo'], group_sizes)
    bo = self.w.get('bo')
    return y if bo is None else y + bo[ids]


# ---------------------------------------------------------------------------- grouped matmul
def grouped_matmul(x, w, group_sizes):
  """x [A, D] sorted by group, w [G, D, F], group_sizes [G] -> [A, F]: rows of group g times
  w[g]. Rows past sum(group_sizes) are undefined (the caller ignores them)."""
  if jax.default_backend() == 'cpu':
    return blocked_grouped_matmul(x, w, group_sizes)
  return jax.lax.ragged_dot(x, w, group_sizes)


def block_rows(num_rows: int, num_groups: int) -> int:
  """Rows per block: the power of two (>= 8) nearest above A / 2G, so that there are about
  2G full blocks plus at most G partly padded ones (one per group)."""
  target = max(1, -(-num_rows // (2 * num_groups)))
  return max(8, 1 << (target - 1).bit_length())


def blocked_grouped_matmul(x, w, group_sizes):
  """`grouped_matmul` in blocks: each group's rows are padded to a whole number of blocks of
  `block_rows` rows, every block multiplies its group's weight (one batched matmul over blocks
  with the weights gathered per block), and the rows are gathered back. Costs the rows' FLOPs
  plus at most G blocks of padding; the gathered weights take about 3x W."""
  a, g = x.shape[0], w.shape[0]
  bs = block_rows(a, g)
  nb = -(-a // bs) + g
  sizes = group_sizes.astype(jnp.int32)
  end = jnp.cumsum(sizes)
  start = end - sizes
  padded = (sizes + bs - 1) // bs * bs
  pend = jnp.cumsum(padded)
  pstart = pend - padded
  row = jnp.arange(a, dtype=jnp.int32)
  grp = jnp.searchsorted(end, row, side='right')       # G for rows past the sum
  valid = grp < g
  grp = jnp.minimum(grp, g - 1)
  dest = jnp.where(valid, pstart[grp] + row - start[grp], nb * bs)
  xp = jnp.zeros((nb * bs, x.shape[1]), x.dtype).at[dest].set(x, mode='drop')
  block_group = jnp.minimum(jnp.searchsorted(pend, jnp.arange(nb) * bs, side='right'), g - 1)
  yp = jnp.einsum('NbD,NDF->NbF', xp.reshape(nb, bs, -1), w[block_group])
  y = yp.reshape(nb * bs, -1)[jnp.minimum(dest, nb * bs - 1)]
  return jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))


# ---------------------------------------------------------------------------- dense
def dense(x, r: Routing, experts: Experts, capacity_factor: float):
  del capacity_factor
  chosen = jax.nn.one_hot(r.expert, experts.num)                     # [B, T, K, E]
  combine = jnp.einsum('BTKE,BTK->BTE', chosen, r.weight) * r.valid[..., None]
  return experts.dense(x, combine)


# ---------------------------------------------------------------------------- capacity
def capacity_slots(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
  """Slots per expert per row: ceil(capacity_factor * K * T / E), between 1 and T."""
  return max(1, min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


def dispatch_tensors(r: Routing, num_experts: int, cap: int):
  """0/1 dispatch [B, T, E, C] and combine (dispatch * w) [B, T, E, C] of the capacity rule."""
  b, t, k = r.expert.shape
  chosen = jax.nn.one_hot(r.expert, num_experts) * r.valid[..., None, None]   # [B, T, K, E]
  order = chosen.reshape(b, t * k, num_experts)
  # Slot of each assignment in its expert's buffer, in (position, choice) order.
  slot = (jnp.cumsum(order, axis=1) - 1.0) * order
  kept = order * (slot < cap)
  dispatch = (kept[..., None] * jax.nn.one_hot(slot.astype(jnp.int32), cap))
  dispatch = dispatch.reshape(b, t, k, num_experts, cap)
  combine = jnp.sum(dispatch * r.weight[..., None, None], axis=2)
  return jnp.sum(dispatch, axis=2), combine


def capacity(x, r: Routing, experts: Experts, capacity_factor: float):
  b, t, _ = x.shape
  cap = capacity_slots(capacity_factor, r.expert.shape[-1], t, experts.num)
  dispatch, combine = dispatch_tensors(r, experts.num, cap)
  expert_in = jnp.einsum('BTEC,BTD->EBCD', dispatch.astype(x.dtype), x)
  expert_in = constrain(expert_in, R.EXPERT_TOKENS)
  expert_out = experts.buffers(expert_in)
  expert_out = constrain(expert_out, R.EXPERT_TOKENS)
  return jnp.einsum('BTEC,EBCD->BTD', combine.astype(x.dtype), expert_out)


def _capacity_local(x, r: Routing, experts: Experts, capacity_factor: float, axes, n: int):
  """Capacity dispatch on one device's rows; its experts are E / n of the global E."""
  _, t, _ = x.shape
  e = experts.num * n
  cap = capacity_slots(capacity_factor, r.expert.shape[-1], t, e)
  dispatch, combine = dispatch_tensors(r, e, cap)
  expert_in = jnp.einsum('BTEC,BTD->EBCD', dispatch.astype(x.dtype), x)      # [E, b, C, D]
  # Expert block j goes to device j; rows from every device arrive: [E / n, n b, C, D].
  expert_in = jax.lax.all_to_all(expert_in, axes, 0, 1, tiled=True)
  expert_out = experts.buffers(expert_in)
  expert_out = jax.lax.all_to_all(expert_out, axes, 1, 0, tiled=True)       # [E, b, C, D]
  return jnp.einsum('BTEC,EBCD->BTD', combine.astype(x.dtype), expert_out)


# ---------------------------------------------------------------------------- ragged
def _flat(x, r: Routing):
  b, t, d = x.shape
  k = r.expert.shape[-1]
  return x.reshape(b * t, d), r.expert.reshape(b * t * k), k


def _combine(y_assign, r: Routing, shape):
  b, t, d = shape
  k = r.expert.shape[-1]
  w = (r.weight * r.valid[..., None]).astype(y_assign.dtype)
  return jnp.einsum('BTKD,BTK->BTD', y_assign.reshape(b, t, k, d), w)


def ragged(x, r: Routing, experts: Experts, capacity_factor: float):
  del capacity_factor
  xf, e_flat, k = _flat(x, r)
  order = jnp.argsort(e_flat, stable=True)
  e_sorted = e_flat[order]
  sizes = jnp.sum(jax.nn.one_hot(e_flat, experts.num, dtype=jnp.int32), axis=0)
  ys = experts.rows(xf[order // k], sizes, e_sorted)
  y_assign = jnp.zeros_like(ys).at[order].set(ys)
  return _combine(y_assign, r, x.shape)


def _ragged_local(x, r: Routing, experts: Experts, capacity_factor: float, axes, n: int):
  """Ragged dispatch of one device's rows through fixed [n, A, D] all-to-all buffers."""
  del capacity_factor
  xf, e_flat, k = _flat(x, r)
  a, local = e_flat.shape[0], experts.num
  order = jnp.argsort(e_flat, stable=True)
  e_sorted = e_flat[order]
  dest = e_sorted // local
  counts = jnp.sum(jax.nn.one_hot(dest, n, dtype=jnp.int32), axis=0)
  pos = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest]   # row within its device's block
  send_x = jnp.zeros((n, a, xf.shape[-1]), x.dtype).at[dest, pos].set(xf[order // k])
  send_e = jnp.full((n, a), local, jnp.int32).at[dest, pos].set(e_sorted % local)
  recv_x = jax.lax.all_to_all(send_x, axes, 0, 0, tiled=True).reshape(n * a, -1)
  recv_e = jax.lax.all_to_all(send_e, axes, 0, 0, tiled=True).reshape(n * a)
  # Empty rows carry id `local`: they sort last, outside every group.
  order2 = jnp.argsort(recv_e, stable=True)
  sizes = jnp.sum(jax.nn.one_hot(recv_e, local, dtype=jnp.int32), axis=0)
  ys = experts.rows(recv_x[order2], sizes, recv_e[order2])
  out = jnp.zeros_like(ys).at[order2].set(ys).reshape(n, a, -1)
  back = jax.lax.all_to_all(out, axes, 0, 0, tiled=True)
  y_assign = jnp.zeros((a, xf.shape[-1]), back.dtype).at[order].set(back[dest, pos])
  return _combine(y_assign, r, x.shape)


DISPATCHERS: dict[str, Callable] = {'dense': dense, 'capacity': capacity, 'ragged': ragged}
_LOCAL: dict[str, Callable] = {'capacity': _capacity_local, 'ragged': _ragged_local}


# ---------------------------------------------------------------------------- expert parallel
def _entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def expert_parallel_axes(num_rows: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
  """(expert axes, token axes) of the active layout when expert parallelism applies, else None.

  Applies when the 'expert' parameter dimension maps onto mesh axes of total size > 1 and the
  rows divide over the batch axes times the expert axes (tokens are split over both)."""
  layout = active_layout()
  if layout is None or layout.mesh.devices.size == 1:
    return None
  ep = tuple(a for a in layout.rules.axes('expert') if layout.sizes[a] > 1)
  if not ep:
    return None
  tokens = layout.batch_axes + tuple(a for a in ep if a not in layout.batch_axes)
  if num_rows % math.prod(layout.sizes[a] for a in tokens):
    return None
  return ep, tokens


def run(kind: str, x, r: Routing, experts: Experts, capacity_factor: float, *,
        expert_parallel: bool = True):
  """`DISPATCHERS[kind]`, under shard_map over the expert axes when they shard the experts."""
  axes = expert_parallel_axes(x.shape[0]) if expert_parallel and kind in _LOCAL else None
  if axes is None:
    return DISPATCHERS[kind](x, r, experts, capacity_factor)
  ep, tokens = axes
  layout = active_layout()
  n = math.prod(layout.sizes[a] for a in ep)
  row = P(_entry(tokens))
  w_specs = {k: P(_entry(ep)) for k in experts.w}
  local = _LOCAL[kind]

  def body(w, x, expert, weight, valid):
    ex = dataclasses.replace(experts, w=w, sharded=False)
    return local(x, Routing(expert, weight, valid), ex, capacity_factor, ep, n)

  return jax.shard_map(body, mesh=layout.mesh, in_specs=(w_specs, row, row, row, row),
                       out_specs=row)(experts.w, x, r.expert, r.weight, r.valid)
