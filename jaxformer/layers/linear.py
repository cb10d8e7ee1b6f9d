"""Dense contractions y = x . w whose backward pass contracts in the order XLA:CPU runs fastest.

    y[..., O...] = sum_I x[..., I...] w[I..., O...]      (the last `k` axes of x with the first k of w)
    dx = dy . w^T,   dw = x^T . dy                       (contracted over the leading axes)

This is `jnp.einsum('...D,DF->...F', x, w)` (or 'BTNH,NHD->BTD' for k = 2) with a hand-written
VJP. JAX's own transpose rule computes the weight gradient as (dy^T x)^T: XLA's dot needs the
contracted axis of its left operand to be minor, so it first transposes the activation gradient
dy (for the FFN [B T, F], the largest array of the layer). Writing it as x^T dy instead
transposes x, and dw comes out in w's layout. Same products and sums, different operand order;
on the 2-core reference CPU the SwiGLU FFN's forward and backward take 0.64x the time
(docs/benchmarks.md, "Training step vs peers on CPU").
"""

from __future__ import annotations

import functools

import jax


def _dims(k: int, x_ndim: int, w_ndim: int):
  return (tuple(range(x_ndim - k, x_ndim)), tuple(range(k))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, k: int = 1) -> jax.Array:
  """x [..., I_1..I_k] . w [I_1..I_k, O...] -> [..., O...] in the promoted dtype of x and w."""
  return jax.lax.dot_general(x, w, _dims(k, x.ndim, w.ndim))


def _dense_fwd(x, w, k):
  return dense(x, w, k), (x, w)


def _dense_bwd(k, res, dy):
  x, w = res
  lead, outs = x.ndim - k, w.ndim - k
  # dx [..., I...] = dy [..., O...] . w [I..., O...] over O.
  dx = jax.lax.dot_general(dy, w, ((tuple(range(dy.ndim - outs, dy.ndim)),
                                    tuple(range(k, w.ndim))), ((), ())))
  # dw [I..., O...] = x [..., I...] . dy [..., O...] over the leading axes: x is transposed.
  dw = jax.lax.dot_general(x, dy, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
