"""The Conformer convolution module (Gulati et al. 2020, sec. 2.2 and fig. 2).

    u = GLU(x W_1 + b_1),  GLU([a; g]) = a * sigmoid(g)          pointwise conv D -> 2C, GLU -> C
    v_t = b_dw + sum_{j=0}^{k-1} w_j * u_{t + j - p}              depthwise conv, kernel k
    y = swish(LN(v)) W_2 + b_2                                    pointwise conv C -> D
with C = D (the paper's expansion factor 2 before the GLU). The layer norm before W_1 and the
dropout after W_2 are the residual wiring's (models/block.py `SubLayer`), as in the paper.

Causal (`causal=True`): p = k - 1, so output t reads inputs t-k+1..t only (left padding). Not
causal: p = (k - 1) / 2 ("same" padding, k odd so that the window is centred).

Rows, padding and packed examples: a tap reads zero outside the row, at padding (segment id 0)
and in another segment (u_s counts for output t only when segment_ids[s] == segment_ids[t]),
so packed examples never mix and padding never leaks, whatever the kernel width. The conv is
written as k shifted multiply-adds (k is small), which is what makes that per-tap mask cheap.

Decoding (causal only): the state is the last k - 1 GLU outputs and their segment ids
{'inputs': [B, k-1, C], 'segment_ids': [B, k-1]}; a cached call prepends them to its new
positions, so a token at a time gives the outputs of the whole sequence at once.

Einsum letters: B batch, T length, D model dim, C conv channels (= D), K kernel width (k).
Parameters: w_in [D, 2, C] ('embed', None, 'mlp'), b_in [2, C]; w_dw [K, C] (None, 'mlp'),
b_dw [C]; norm scale / bias [C]; w_out [C, D] ('mlp', 'embed'), b_out [D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import make_init, param, residual_init, zeros
from jaxformer.layers.linear import project
from jaxformer.layers.norms import LayerNorm
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain


def depthwise_conv(u_padded: jax.Array, seg_padded: jax.Array, seg: jax.Array,
                   w: jax.Array) -> jax.Array:
  """v[b, t, c] = sum_j w[j, c] u_padded[b, t + j, c] [seg_padded[b, t + j] == seg[b, t]].

  u_padded [B, T + K - 1, C], seg_padded [B, T + K - 1], seg [B, T], w [K, C] -> [B, T, C].
  """
  k, t = w.shape[0], seg.shape[1]
  out = jnp.zeros(u_padded.shape[:1] + (t,) + u_padded.shape[2:], u_padded.dtype)
  for j in range(k):
    same = (seg_padded[:, j:j + t] == seg)[..., None]
    out = out + jnp.where(same, u_padded[:, j:j + t], 0) * w[j]
  return out


class ConvModule(nnx.Module):
  """x [B, T, D] (already normed) -> [B, T, D]; see the module docstring."""
  PROJECTIONS = ('w_in', 'w_out')  # jaxformer/layers/linear.py `project`

  def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    d, k = cfg.d_model, cfg.conformer.kernel_size
    c = d
    pdt = cfg.params_dtype
    self.causal, self.kernel_size, self.dtype = causal, k, cfg.compute_dtype
    self.left = k - 1 if causal else (k - 1) // 2
    init = make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2))
    self.w_in = param(rngs, init, (d, 2, c), ('embed', None, 'mlp'), pdt)
    # [2, C] like a matrix by its names: the role keeps weight decay off.
    self.b_in = param(rngs, zeros, (2, c), (None, 'mlp'), pdt, role='bias')
    self.w_dw = param(rngs, make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=1), (k, c),
                      (None, 'mlp'), pdt)
    self.b_dw = param(rngs, zeros, (c,), ('mlp',), pdt)
    self.norm = LayerNorm(c, eps=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs,
                          param_dtype=pdt, dtype=self.dtype)
    self.w_out = param(rngs, residual_init(cfg.init, cfg.init_std, cfg.num_layers,
                                           cfg.scaled_residual_init),
                       (c, d), ('mlp', 'embed'), pdt)
    self.b_out = param(rngs, zeros, (d,), ('embed',), pdt)

  def init_state(self, batch: int, dtype=None) -> dict[str, jax.Array]:
    """Empty decoding state: k - 1 zero inputs in segment 0 (never read)."""
    if not self.causal:
      raise ValueError('cached decoding needs a causal convolution (model.conformer.causal)')
    c = self.w_dw.shape[1]
    return {'inputs': jnp.zeros((batch, self.kernel_size - 1, c), dtype or self.dtype),
            'segment_ids': jnp.zeros((batch, self.kernel_size - 1), jnp.int32)}

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, *,
               state: dict | None = None) -> tuple[jax.Array, dict | None]:
    """x [B, T, D], segment_ids [B, T] (0 = padding; None = one example per row) ->
    (y [B, T, D], new decoding state or None)."""
    b, t, _ = x.shape
    x = x.astype(self.dtype)
    seg = (jnp.ones((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    a = project(self, 'w_in', x, self.w_in[...].astype(self.dtype))
    a = a + self.b_in[...].astype(self.dtype)
    u = a[..., 0, :] * jax.nn.sigmoid(a[..., 1, :])  # 'BT2C' -> 'BTC'
    u = constrain(jnp.where((seg != 0)[..., None], u, 0), R.FFN_HIDDEN)
    if state is None:
      pad = (self.left, self.kernel_size - 1 - self.left)
      u_p = jnp.pad(u, ((0, 0), pad, (0, 0)))
      seg_p = jnp.pad(seg, ((0, 0), pad), constant_values=-1)
      new_state = None
    else:
      if not self.causal:
        raise ValueError('cached decoding needs a causal convolution (model.conformer.causal)')
      u_p = jnp.concatenate([state['inputs'].astype(u.dtype), u], axis=1)
      seg_p = jnp.concatenate([state['segment_ids'], seg], axis=1)
      keep = self.kernel_size - 1
      new_state = {'inputs': u_p[:, u_p.shape[1] - keep:].astype(state['inputs'].dtype),
                   'segment_ids': seg_p[:, seg_p.shape[1] - keep:]}
    v = depthwise_conv(u_p, seg_p, seg, self.w_dw[...].astype(self.dtype))
    v = v + self.b_dw[...].astype(self.dtype)
    h = jax.nn.silu(self.norm(v))
    y = project(self, 'w_out', h, self.w_out[...].astype(self.dtype))
    y = y + self.b_out[...].astype(self.dtype)
    return y, new_state
