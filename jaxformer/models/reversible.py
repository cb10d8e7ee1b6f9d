"""Reversible residual layers (Gomez et al. 2017) as in the Reformer (Kitaev et al. 2020, sec. 3).

Two activation streams of width D both start as the embedding x and every layer maps

    Y1 = X1 + F(X2),   Y2 = X2 + G(Y1);      the stack returns (Y1_L + Y2_L) / 2 (as trax),

where F is the attention branch drop(attn(norm(x))) and G the FFN branch of an ordinary
`TransformerBlock` (same parameters as a non-reversible stack, without the residual add). The
inputs follow from the outputs, X2 = Y2 - G(Y1), X1 = Y1 - F(X2), so the backward pass (a
custom VJP over the whole stack) keeps only the last (Y1, Y2) and walks down the layers,
reconstructing each layer's inputs and back-propagating through F and G recomputed there:

    dY1' = dY1 + (dG/dY1)^T dY2,   dX1 = dY1',   dX2 = dY2 + (dF/dX2)^T dY1'

(and the parameter gradients of G from dY2, of F from dY1'). Activation memory therefore does
not grow with depth; the price is one extra forward of every layer in the backward pass, and
`model.remat` has nothing to add (it is not applied). Layers run under `lax.scan` over the
stacked parameters when `model.scan_layers`, else in a Python loop. Decoding with a KV cache
runs the same forward without the custom VJP. Configs validate that the stack is pre- or
sandwich-norm, dense (no MoE) and dropout-free (the recomputation would need the same masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention import AttentionMask


def _branch(sub, fn, x, deterministic):
  """h with y = x + h for a pre- / sandwich-norm `SubLayer` around `fn`."""
  h = fn(sub.norm(x))
  if sub.out_norm is not None:
    h = sub.out_norm(h)
  h = sub.drop_path(sub.dropout(h, deterministic=deterministic), deterministic=deterministic)
  return h.astype(x.dtype)


def _loop(step, carry, xs, *, scan: bool, reverse: bool = False):
  """lax.scan(step, carry, xs) or the same as a Python loop over the leading axis."""
  if scan:
    return jax.lax.scan(step, carry, xs, reverse=reverse)
  n = jax.tree.leaves(xs)[0].shape[0]
  outs = [None] * n
  for i in (reversed(range(n)) if reverse else range(n)):
    carry, outs[i] = step(carry, jax.tree.map(lambda a: a[i], xs))
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


class _Layers:
  """F and G of one stacked layer as pure functions of its (params, rest) slice."""

  def __init__(self, layers: nnx.Module, deterministic: bool):
    self.graphdef, self.params, self.rest = nnx.split(layers, nnx.Param, ...)
    self.deterministic = deterministic

  def block(self, p, r):
    return nnx.merge(self.graphdef, p, r, copy=True).blocks[0]

  def f(self, p, r, x, ctx, cache=None):
    """Attention branch F(x) -> (h, new cache)."""
    block = self.block(p, r)
    mask, bias = ctx
    new = []

    def attend(h):
      y, c = block.self_attn(h, mask, bias=bias, cache=cache, deterministic=self.deterministic)
      new.append(c)
      return y

    return _branch(block.attn_sub, attend, x, self.deterministic), new[0]

  def g(self, p, r, x):
    """FFN branch G(x)."""
    block = self.block(p, r)
    return _branch(block.ffn_sub, lambda h: block.ffn(h, deterministic=self.deterministic), x,
                   self.deterministic)


def forward_streams(layers: nnx.Module, x1, x2, mask: AttentionMask, *, bias=None, cache=None,
                    deterministic: bool = True, scan: bool = True, custom_vjp: bool = True):
  """(X1, X2) -> ((Y1, Y2) after every layer, new cache or None).

  `custom_vjp=False` leaves the backward pass to ordinary autodiff (the same network, storing
  every layer's activations): the reference the memory-saving VJP is tested against. A cache
  (decoding) implies the plain forward.
  """
  fns = _Layers(layers, deterministic)
  ctx = (mask, bias)
  if cache is not None or not custom_vjp:
    def step(carry, xs):
      (a, b), (p, r, c) = carry, xs
      h, c = fns.f(p, r, b, ctx, None if c is None else c[0]['self'])
      a = a + h
      return (a, b + fns.g(p, r, a)), (None if c is None else [{'self': c}])

    (y1, y2), new_cache = _loop(step, (x1, x2), (fns.params, fns.rest, cache), scan=scan)
    return (y1, y2), new_cache
  return _reversible(fns, scan)(fns.params, fns.rest, ctx, x1, x2), None


def _reversible(fns: _Layers, scan: bool):
  """The stack as a custom-VJP function of (params, rest, ctx, x1, x2) -> (y1, y2)."""

  def forward(params, rest, ctx, x1, x2):
    def step(carry, xs):
      (a, b), (p, r) = carry, xs
      a = a + fns.f(p, r, b, ctx)[0]
      return (a, b + fns.g(p, r, a)), None

    return _loop(step, (x1, x2), (params, rest), scan=scan)[0]

  def run_fwd(params, rest, ctx, x1, x2):
    y = forward(params, rest, ctx, x1, x2)
    return y, (params, rest, ctx, y)  # only the top layer's outputs are kept

  def run_bwd(res, dy):
    params, rest, ctx, (y1, y2) = res
    leaves, treedef = jax.tree.flatten(ctx)
    diff = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]  # e.g. a T5 bias
    dctx_primal = [leaf for leaf, d in zip(leaves, diff) if d]

    def f_of(p, r, x, diff_leaves):
      it = iter(diff_leaves)
      full = [next(it) if d else leaf for leaf, d in zip(leaves, diff)]
      return fns.f(p, r, x, jax.tree.unflatten(treedef, full))[0]

    def step(carry, xs):
      (y1, y2, dy1, dy2, dctx), (p, r) = carry, xs
      g_out, g_vjp = jax.vjp(lambda p, y: fns.g(p, r, y), p, y1)
      x2 = y2 - g_out
      dp_g, dy1_g = g_vjp(dy2)
      dy1 = dy1 + dy1_g
      f_out, f_vjp = jax.vjp(lambda p, x, c: f_of(p, r, x, c), p, x2, dctx_primal)
      x1 = y1 - f_out
      dp_f, dx2_f, dc = f_vjp(dy1)
      dctx = [a + b for a, b in zip(dctx, dc)]
      return (x1, x2, dy1, dy2 + dx2_f, dctx), jax.tree.map(jnp.add, dp_f, dp_g)

    zeros = [jnp.zeros_like(leaf) for leaf in dctx_primal]
    (_, _, dx1, dx2, dctx), dparams = _loop(step, (y1, y2, dy[0], dy[1], zeros),
                                            (params, rest), scan=scan, reverse=True)
    it = iter(dctx)
    dctx_full = [next(it) if d else _zero_cotangent(leaf) for leaf, d in zip(leaves, diff)]
    return (dparams, jax.tree.map(_zero_cotangent, rest), jax.tree.unflatten(treedef, dctx_full),
            dx1, dx2)

  run = jax.custom_vjp(forward)
  run.defvjp(run_fwd, run_bwd)
  return run


def reconstruct(layers: nnx.Module, y1, y2, mask: AttentionMask, *, bias=None,
                deterministic: bool = True, scan: bool = True):
  """The stack's inputs (X1, X2) recovered from its outputs (Y1, Y2), top layer first."""
  fns = _Layers(layers, deterministic)

  def step(carry, xs):
    (a, b), (p, r) = carry, xs
    b = b - fns.g(p, r, a)
    return (a - fns.f(p, r, b, (mask, bias))[0], b), None

  return _loop(step, (y1, y2), (fns.params, fns.rest), scan=scan, reverse=True)[0]


def reversible_stack(layers: nnx.Module, x, mask: AttentionMask, *, bias=None, cache=None,
                     deterministic: bool = True, scan: bool = True, custom_vjp: bool = True):
  """x [B, T, D] -> ((Y1 + Y2) / 2 with X1 = X2 = x, new cache or None)."""
  (y1, y2), new_cache = forward_streams(layers, x, x, mask, bias=bias, cache=cache,
                                        deterministic=deterministic, scan=scan,
                                        custom_vjp=custom_vjp)
  return (y1 + y2) / 2, new_cache
