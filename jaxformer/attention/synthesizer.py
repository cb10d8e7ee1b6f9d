"""Synthesizer attention (Tay et al. 2021, sec. 3): attention weights without token-token products.

    Y_n = softmax(B_n + [s Q_n K_n^T if mode ends in '+dot']) V_n,     per head n

The synthesized logits B_n [T, S] come from one of:
  'dense'             B[t, :] = F(q_t)[kv positions],  F(q) = W2 relu(W1 q + b1) + b2,
                      W1 [H, H], W2 [H, L]: every query writes its own row of logits over the
                      L = max_length key positions;
  'factorized_dense'  F_A(q) in R^a, F_B(q) in R^b (a = factor, b = ceil(L / a)), sharing the
                      hidden layer relu(W1 q + b1); C[j] = F_A(q)[j mod a] * F_B(q)[j div a] for
                      j < L: H_A tiles A, H_B repeats each entry of B a times, so C is the
                      flattened outer product and every pair (A_p, B_r) appears once;
  'random'            B = R[q positions][:, kv positions], R [L, L] ~ N(0, 1/L) (LeCun normal,
                      as the authors' Long Range Arena code), independent of the input;
  'factorized_random' R = R1 R2^T, R1, R2 [L, k] (k = factor), R1 ~ N(0, 1/L), R2 ~ N(0, 1/k);
  'dense+dot', 'random+dot'  the paper's mixture: the synthesized logits plus the ordinary
                      scaled dot-product logits, with both mixing weights fixed to 1 (as the
                      authors' LRA code). A learned convex weight alpha would only rescale each
                      term, which W2, b2 / R and W^Q already learn.
Shapes: B batch, T query length, S key length, N query heads, K kv heads, H head dim, L the
model's max_length, I the synthesizer's hidden width (= H). Parameters are per query head.

The core receives projected heads, so F is applied to q_t = x_t W^Q_n (after RoPE when the model
uses it) instead of x_t. F(x_t W^Q) is the paper's F(x_t) with W1 W^Q as its first layer: in the
pure modes W^Q is used only here, so the pair (W^Q, W1) spans the paper's first layer of width H
per head (the width of the authors' code); in the '+dot' modes W^Q is shared with the dot
product. Keys are unused in the pure modes (W^K then gets no gradient).

Logits are indexed by position (mask positions, default arange), so the KV-cached decoding path
works unchanged: T new queries over S cache slots read rows q_pos and columns kv_pos. Positions
must be < max_length (a call with T or S > max_length fails; larger positions would be clamped by
JAX's gather). Masking (causal, padding / segment ids), the fully masked row -> 0 rule,
GQA, dropout and the sown weights are those of `core.dot_product_attention`, which receives the
synthesized logits as its additive bias (with scale 0 in the pure modes). Random modes hold an
n x n matrix by construction: the kind is quadratic in memory, like dense attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.core import dot_product_attention
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, ConfigError, check_choice
from jaxformer.layers import base

MODES = ('dense', 'random', 'factorized_random', 'factorized_dense', 'dense+dot', 'random+dot')


class FixedSynthesis(nnx.Variable):
  """A random synthesizer matrix kept fixed (`trainable=False`): state, but not an nnx.Param."""


@registry.register('synthesizer', 'xla', unsupported={
    'cross': 'synthesized logits index key positions of the query\'s own sequence (the paper '
             'replaces self-attention)',
    'window': 'not implemented for the synthesizer',
    'bias': 'not implemented for the synthesizer',
    'softcap': 'not implemented for the synthesizer',
    'shaw': 'not implemented for the synthesizer',
})
class SynthesizerAttention(nnx.Module):
  """Synthesizer core; options `mode` ('dense'), `trainable` (True), `factor` (8), `sow_weights`.

  `trainable=False` (random modes only) stores R (or R1, R2) as `FixedSynthesis` variables, which
  optimizers and `nnx.grad` (filter nnx.Param) leave alone.
  """

  features = frozenset({'causal', 'padding', 'segments', 'decode', 'dropout', 'weights'})
  example_options = {'mode': 'dense', 'factor': 2}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None,
               max_length: int | None = None, **unused):
    opts = registry.options(cfg, {'mode': 'dense', 'trainable': True, 'factor': 8,
                                  'sow_weights': False})
    del dtype, unused
    mode, factor = opts['mode'], opts['factor']
    check_choice('model.attention.options.mode', mode, MODES)
    if not isinstance(factor, int) or factor < 1:
      raise ConfigError(f'model.attention.options.factor={factor!r} is invalid: a positive '
                        'integer (rank of factorized_random, a of factorized_dense)')
    if not opts['trainable'] and 'random' not in mode:
      raise ConfigError(f'model.attention.options.trainable=False is invalid for mode {mode!r}: '
                        'only the random modes have a fixed-or-trained matrix R')
    if max_length is None:
      raise ConfigError('model.attention.kind=synthesizer needs max_length (model.max_length): '
                        'the synthesized logits cover max_length key positions')
    if rngs is None:
      raise ValueError('SynthesizerAttention has parameters and needs rngs')
    self.mode, self.max_length = mode, max_length
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.dropout_rate = cfg.dropout
    self.sow_weights = bool(opts['sow_weights'])
    pdt = param_dtype or jnp.float32
    n, h, length = num_heads, head_dim, max_length

    def weight(shape, names, std=None, kind=nnx.Param):
      init = (base.normal_init(std) if std is not None else
              nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0))
      if kind is nnx.Param:
        return base.param(rngs, init, shape, names, pdt)
      return kind(init(rngs.params(), shape, pdt), out_sharding=names, eager_sharding=False)

    fixed = FixedSynthesis if not opts['trainable'] else nnx.Param
    w1 = b1 = w2 = b2 = wa = ba = r = r1 = r2 = None
    self.a, self.b = factor, -(-length // factor)
    if 'dense' in mode:
      w1 = weight((n, h, h), ('heads', 'head_dim', None))
      # The biases are [N, .] per head: the role keeps weight decay off them.
      b1 = base.param(rngs, base.zeros, (n, h), ('heads', None), pdt, role='bias')
      if mode == 'factorized_dense':
        wa = weight((n, h, self.a), ('heads', None, None))
        ba = base.param(rngs, base.zeros, (n, self.a), ('heads', None), pdt, role='bias')
        w2 = weight((n, h, self.b), ('heads', None, None))
        b2 = base.param(rngs, base.zeros, (n, self.b), ('heads', None), pdt, role='bias')
      else:
        w2 = weight((n, h, length), ('heads', None, 'position'))
        b2 = base.param(rngs, base.zeros, (n, length), ('heads', 'position'), pdt,
                        role='bias')
    elif mode == 'factorized_random':
      r1 = weight((n, length, factor), ('heads', 'position', None), 1 / math.sqrt(length), fixed)
      r2 = weight((n, length, factor), ('heads', 'position', None), 1 / math.sqrt(factor), fixed)
    else:
      r = weight((n, length, length), ('heads', 'position', None), 1 / math.sqrt(length), fixed)
    # W1, b1 first layer; W2, b2 the length (or F_B) layer; Wa, ba F_A; R or R1, R2 random.
    self.w1, self.b1, self.w2, self.b2 = nnx.data(w1), nnx.data(b1), nnx.data(w2), nnx.data(b2)
    self.wa, self.ba = nnx.data(wa), nnx.data(ba)
    self.r, self.r1, self.r2 = nnx.data(r), nnx.data(r1), nnx.data(r2)

  def synthesized_logits(self, q: jax.Array, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
    """B [B, N, T, S] float32 for q [B, T, N, H] and positions q_pos [B, T], kv_pos [B, S]."""
    f32 = jnp.float32
    if self.r is not None:
      heads = jnp.arange(self.num_heads)[None, :, None, None]
      return self.r[...].astype(f32)[heads, q_pos[:, None, :, None], kv_pos[:, None, None, :]]
    if self.r1 is not None:
      r1 = self.r1[...].astype(f32)[:, q_pos]  # [N, B, T, k]
      r2 = self.r2[...].astype(f32)[:, kv_pos]  # [N, B, S, k]
      return jnp.einsum('NBTJ,NBSJ->BNTS', r1, r2)
    hidden = jax.nn.relu(jnp.einsum('BTNH,NHI->BTNI', q.astype(f32), self.w1[...].astype(f32))
                         + self.b1[...].astype(f32))
    tail = (jnp.einsum('BTNI,NIJ->BTNJ', hidden, self.w2[...].astype(f32))
            + self.b2[...].astype(f32))
    if self.wa is not None:
      head = (jnp.einsum('BTNI,NIJ->BTNJ', hidden, self.wa[...].astype(f32))
              + self.ba[...].astype(f32))
      rows = (tail[..., :, None] * head[..., None, :]).reshape(*head.shape[:3], self.a * self.b)
    else:
      rows = tail
    rows = rows[..., :self.max_length].transpose(0, 2, 1, 3)  # [B, N, T, L]
    b, n, t, _ = rows.shape
    cols = jnp.broadcast_to(kv_pos[:, None, None, :], (b, n, t, kv_pos.shape[-1]))
    return jnp.take_along_axis(rows, cols, axis=-1)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None,
               bias=None, deterministic: bool = True, dropout_rng: jax.Array | None = None,
               **unused) -> jax.Array:
    mask = AttentionMask() if mask is None else mask
    if bias is not None:
      raise ValueError('synthesizer attention takes no additive bias (feature "bias" is refused)')
    b, t = q.shape[:2]
    s = k.shape[1]
    if max(t, s) > self.max_length:
      raise ValueError(f'synthesizer: {t} queries / {s} keys exceed max_length='
                       f'{self.max_length}, the number of positions R and W2 cover')
    if not deterministic and self.dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError('attention dropout is active (deterministic=False, '
                       f'model.attention.dropout={self.dropout_rate}) but no dropout_rng was given')
    q_pos, kv_pos = mask.positions(t, s)
    q_pos = jnp.broadcast_to(q_pos, (b, t))
    kv_pos = jnp.broadcast_to(kv_pos, (b, s))
    logits = self.synthesized_logits(q, q_pos, kv_pos)
    # Scale 0 removes the dot-product term of the pure modes and keeps the shared masking.
    scale = self.scale if self.mode.endswith('+dot') else 0.0
    out, probs = dot_product_attention(
        q, k, v, mask, bias=logits, scale=scale,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng,
        return_weights=True)
    if self.sow_weights:
      self.sow(nnx.Intermediate, 'attention_weights', probs)
    return out
