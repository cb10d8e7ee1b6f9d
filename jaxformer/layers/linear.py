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
import jax.numpy as jnp
from flax import nnx

from jaxformer.layers import act_quant


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


# ---------------------------------------------------------------------- projection sites
# A module computes its parameter matrices' products through `project`, and names them in its
# class attribute PROJECTIONS. Features that act at a matrix attach variables next to it, named
# after it: activation quantization (`<name>_act`, jaxformer/layers/act_quant.py, for the names
# in ACT_INPUTS) and LoRA dropout (`<name>_lora_a`, `_lora_b`, `_lora_key`, attached inside
# the train step by jaxformer/finetune/lora.py `attach_dropout_paths`).
LORA_A, LORA_B, LORA_KEY = '_lora_a', '_lora_b', '_lora_key'


class LoraFactor(nnx.Variable):
  """A LoRA factor of one matrix (per layer when stacked), attached for LoRA dropout."""


class LoraKey(nnx.Variable):
  """The dropout key of one matrix's LoRA path (per layer when stacked); metadata `rate` and
  `scale` (alpha / r)."""


def project(module: nnx.Module, name: str, x: jax.Array, w: jax.Array, k: int = 1
            ) -> jax.Array:
  """dense(x, w, k) for the matrix `name` of `module` (w its value in the compute dtype), with
  what is attached to it:

    `<name>_act`   x is fake-quantized with its calibrated range first (act_quant.py);
    LoRA dropout   adds scale ((drop(x) - x) A) B: with w = W0 + scale A B (merged by the
                   ParamPlan), the sum is x W0 + scale (drop(x) A) B, LoRA with dropout on the
                   input of its low-rank path (Hu et al. 2021); drop(x) = x m / (1 - p),
                   m ~ Bernoulli(1 - p) per element.
  """
  y = dense(act_quant.quantize(module, name, x), w, k)
  key = getattr(module, name + LORA_KEY, None)
  if key is None:
    return y
  meta = key.get_metadata()
  keep = 1.0 - meta['rate']
  mask = jax.random.bernoulli(key.get_value(), keep, x.shape)
  dx = x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype) - 1)
  a = getattr(module, name + LORA_A).get_value().astype(x.dtype)
  b = getattr(module, name + LORA_B).get_value().astype(x.dtype)
  return y + (dense(dense(dx, a, k), b) * meta['scale']).astype(y.dtype)
