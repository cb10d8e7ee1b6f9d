"""FNet Fourier token mixing (Lee-Thorp et al. 2021, eq. 3): a parameter-free attention layer.

    y = Re(F_seq(F_hidden(x))),   F_n: the discrete Fourier transform over an axis of length n

Shapes: B batch, T sequence length, D model dim. The core is projection-free
(`uses_projections = False`): the layer passes its input x [B, T, D] as q = k = v of shape
[B, T, 1, D] and takes the [B, T, 1, D] result as its output. `jnp.fft.fft2` costs
O(T D log(T D)) and never forms a T x T matrix. Computed in float32 (complex64).

Padding: positions with segment id 0 are zeroed before the transform, so their content never
reaches a valid output, and their outputs are 0. The transform still runs over the padded length
T, so outputs depend on how much padding there is (as in the paper, which mixes padded batches).
Packed sequences (several non-zero segment ids in one row) are not isolated: the DFT mixes every
position of the row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig

_GLOBAL = 'the DFT over the sequence mixes every position with every other, so '


@registry.register('fnet', 'xla', unsupported={
    'segments': 'the DFT mixes every position of a row, so packed examples would see each other',
    'causal': _GLOBAL + 'position t would see the future',
    'decode': _GLOBAL + 'each new token changes every output; there is no incremental cache',
    'cross': 'Fourier mixing transforms its own input; there are no separate keys to read',
    'bias': 'there are no attention logits for an additive bias (ALiBi, T5) to add to',
    'shaw': 'there are no attention logits or probabilities for relative-position terms',
    'window': _GLOBAL + 'it cannot be restricted to a band',
    'weights': 'there are no attention probabilities to sow',
    'dropout': 'there are no attention probabilities to drop',
    'softcap': 'there are no attention logits to soft-cap',
})
class FNetMixing(nnx.Module):
  """Re(FFT2) token mixing over (sequence, hidden); no options and no parameters."""

  features = frozenset({'padding'})
  uses_projections = False
  subquadratic = True

  def __init__(self, cfg: AttentionConfig, **unused):
    registry.options(cfg, {})
    del unused

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
               bias=None, **unused) -> jax.Array:
    """q = k = v = x [B, T, 1, D] -> Re(DFT_T(DFT_D(x))) [B, T, 1, D]."""
    del k, v
    mask = AttentionMask() if mask is None else mask
    if mask.causal or mask.window is not None or mask.extra is not None or bias is not None:
      raise ValueError('fnet mixing takes only segment ids: a causal, windowed, extra or bias '
                       'mask cannot restrict a Fourier transform over the whole sequence')
    x = q.astype(jnp.float32)
    if mask.q_segment_ids is not None:
      valid = (mask.q_segment_ids != 0)[:, :, None, None]
      x = jnp.where(valid, x, 0.0)
    y = jnp.fft.fft2(x, axes=(1, 3)).real
    if mask.q_segment_ids is not None:
      y = jnp.where(valid, y, 0.0)
    return y.astype(q.dtype)
