"""Selective state-space layer: Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", sec. 3.2 and Algorithm 2) (CATALOG D10).

For every inner channel i and state index n, with a step size dt and projections B, C that
depend on the input (the "selection"), and A, D that do not:

    x, z       = split(u W_in)                                    in_proj
    x          = silu(causal_depthwise_conv_W(x) + b_conv)
    dt, B, C   = split(x W_x);   dt = softplus(dt W_dt + b_dt)    x_proj, dt_proj
    A          = -exp(A_log)                                      [I, N]
    h_t[i, n]  = exp(dt_t[i] A[i, n]) h_{t-1}[i, n] + dt_t[i] B_t[n] x_t[i]
    y_t[i]     = sum_n C_t[n] h_t[i, n] + D[i] x_t[i]
    out        = (y * silu(z)) W_out                              out_proj

(zero-order hold for A, Euler for B, as in the paper and Hugging Face `MambaMixer`'s PyTorch
path, which this module matches). The recurrence h_t = a_t h_{t-1} + b_t is associative under
(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2) (Blelloch 1990; Martin & Cundy 2018), so training runs
it as `jax.lax.associative_scan` (log-depth); `mamba.scan='sequential'` runs the recurrence itself
with `jax.lax.scan` (the test oracle). The scan, dt and the state are float32 whatever the
compute dtype.

Einsum letters: B batch, T length, D model dim, I inner width (mamba.expand * D), N SSM state
size (the paper's N), R dt rank, W convolution width.

Packed sequences and padding (segment ids, 0 = padding): no token sees another segment. The
convolution taps that reach across a segment boundary are masked, and the decay a_t is 0 at a
segment's first token, so the state restarts there. Padding contributes nothing (x is zeroed
before and after the convolution, as HF's attention_mask does) and its outputs are 0.

Cache, for decoding in O(1) per token (`init_cache`):
    {'conv': [B, W-1, I] the last W-1 convolution inputs, oldest first,
     'ssm':  [B, I, N] float32, the state h}
A call with a cache continues the cached sequence: its first token's convolution window reaches
into 'conv' and its scan starts from 'ssm'. It takes any number of new tokens: the prompt (from
an empty cache) and then one token at a time (T = 1 is the recurrent step). Positions are not
used: the recurrence carries the order.

Parameters (Hugging Face MambaMixer names; PyTorch Linear weights are transposed):
    w_in   [D, 2, I]    ('embed', None, 'mlp')   in_proj.weight [2I, D] (the x rows, then z)
    b_in   [2, I]       (None, 'mlp')            in_proj.bias            (mamba.use_bias)
    conv_w [W, I]       (None, 'mlp')            conv1d.weight [I, 1, W]
    conv_b [I]          ('mlp',)                 conv1d.bias             (mamba.conv_bias)
    w_x    [I, R + 2N]  ('mlp', None)            x_proj.weight (dt, B, C columns)
    w_dt   [R, I]       (None, 'mlp')            dt_proj.weight
    b_dt   [I]          ('mlp',)                 dt_proj.bias
    a_log  [I, N]       ('mlp', None)            A_log
    d      [I]          ('mlp',)                 D
    w_out  [I, D]       ('mlp', 'embed')         out_proj.weight
    b_out  [D]          ('embed',)               out_proj.bias           (mamba.use_bias)
The inner width I shards like an FFN's hidden width ('mlp'): every channel's recurrence is
independent. `a_log` is kept out of weight decay (role 'bias'), as in the reference code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import make_init, ones, param, residual_init, zeros
from jaxformer.layers.linear import dense, project
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

INNER = (R.BATCH, R.LENGTH, R.MLP)  # [B, T, I]


# =========================================================================== the scan
def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def scan_associative(a: jax.Array, b: jax.Array) -> jax.Array:
  """h_t = a_t h_{t-1} + b_t, h_{-1} = 0, over axis 1 of a, b [B, T, ...] in log depth."""
  return jax.lax.associative_scan(_combine, (a, b), axis=1)[1]


def scan_sequential(a: jax.Array, b: jax.Array) -> jax.Array:
  """The same recurrence one step at a time (`jax.lax.scan`): the oracle."""

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, hs = jax.lax.scan(step, jnp.zeros_like(b[:, 0]), (jnp.moveaxis(a, 1, 0),
                                                       jnp.moveaxis(b, 1, 0)))
  return jnp.moveaxis(hs, 0, 1)


SCANS = {'associative': scan_associative, 'sequential': scan_sequential}


def selective_scan(x, dt, a, b, c, d, *, h0=None, reset=None, scan: str = 'associative'):
  """The selective SSM in float32.

  x, dt [B, T, I] (dt after softplus); a [I, N] (= -exp(A_log)); b, c [B, T, N]; d [I];
  h0 [B, I, N] the state before the first token (None: 0); reset [B, T] bool: the state
  restarts at these tokens. -> (y [B, T, I], h at the last token [B, I, N]).
  """
  decay = jnp.exp(dt[..., None] * a)                      # 'BTI,IN->BTIN'
  if reset is not None:
    decay = jnp.where(reset[:, :, None, None], 0.0, decay)
  inp = (dt * x)[..., None] * b[:, :, None, :]            # 'BTI,BTN->BTIN'
  if h0 is not None:
    inp = inp.at[:, 0].add(decay[:, 0] * h0)
  h = SCANS[scan](decay, inp)
  y = jnp.einsum('BTIN,BTN->BTI', h, c) + d * x
  return y, h[:, -1]


# =========================================================================== the convolution
def causal_conv(x, w, bias=None, *, segment_ids=None, state=None):
  """Depthwise causal convolution y_t = sum_k w[k] x_{t - (W-1) + k} (+ bias).

  x [B, T, I]; w [W, I]; state [B, W-1, I]: the inputs before x (None: zeros); with segment ids
  [B, T] a tap reads only its own segment (the state counts as the first token's segment).
  -> (y [B, T, I], the new state [B, W-1, I]: the last W-1 inputs of the last token's segment).
  """
  bsz, t, _ = x.shape
  width = w.shape[0]
  if state is None:
    state = jnp.zeros((bsz, width - 1, x.shape[-1]), x.dtype)
  xe = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W-1+T, I]
  if segment_ids is not None:
    se = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (bsz, width - 1)), segment_ids],
                         axis=1)
  y = jnp.zeros_like(x)
  for k in range(width):
    tap = xe[:, k:k + t]
    if segment_ids is not None:
      tap = jnp.where((se[:, k:k + t] == segment_ids)[..., None], tap, 0)
    y = y + tap * w[k].astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(x.dtype)
  new_state = xe[:, t:]
  if segment_ids is not None:
    new_state = jnp.where((se[:, t:] == segment_ids[:, -1:])[..., None], new_state, 0)
  return y, new_state


# =========================================================================== initialisers
def _a_log_init(key, shape, dtype):
  del key  # S4D-real: A[i, n] = -(n + 1)
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


def _dt_bias_init(cfg: ModelConfig):
  m = cfg.mamba

  def init(key, shape, dtype):
    lo, hi = math.log(m.dt_min), math.log(m.dt_max)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape) * (hi - lo) + lo), m.dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)

  return init


def _dt_weight_init(cfg: ModelConfig):
  m = cfg.mamba
  scale = cfg.mamba_dt_rank ** -0.5 * m.dt_scale
  if m.dt_init == 'constant':
    return nnx.initializers.constant(scale)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -scale, scale)


def _conv_init(key, shape, dtype):
  bound = shape[0] ** -0.5  # PyTorch's Conv1d default for a depthwise kernel (fan-in W)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# =========================================================================== the layer
class Mamba(nnx.Module):
  """The Mamba mixer (HF `MambaMixer`): u [B, T, D] -> [B, T, D]; see the module docstring."""
  PROJECTIONS = ('w_in', 'w_x', 'w_out')  # jaxformer/layers/linear.py `project`; not w_dt

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.mamba
    d, i, n, r, w = (cfg.d_model, cfg.mamba_inner_dim, m.d_state, cfg.mamba_dt_rank, m.d_conv)
    pdt = cfg.params_dtype
    self.dtype, self.scan = cfg.compute_dtype, m.scan
    self.d_state, self.dt_rank, self.width = n, r, w
    init = make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2))
    self.w_in = param(rngs, init, (d, 2, i), ('embed', None, 'mlp'), pdt)
    self.b_in = (param(rngs, zeros, (2, i), (None, 'mlp'), pdt, role='bias') if m.use_bias
                 else None)
    self.conv_w = param(rngs, _conv_init, (w, i), (None, 'mlp'), pdt)
    self.conv_b = param(rngs, zeros, (i,), ('mlp',), pdt) if m.conv_bias else None
    self.w_x = param(rngs, make_init(cfg.init, cfg.init_std), (i, r + 2 * n), ('mlp', None), pdt)
    self.w_dt = param(rngs, _dt_weight_init(cfg), (r, i), (None, 'mlp'), pdt)
    self.b_dt = param(rngs, _dt_bias_init(cfg), (i,), ('mlp',), pdt)
    self.a_log = param(rngs, _a_log_init, (i, n), ('mlp', None), pdt, role='bias')
    self.d = param(rngs, ones, (i,), ('mlp',), pdt)
    self.w_out = param(rngs, residual_init(cfg.init, cfg.init_std, cfg.num_layers,
                                           cfg.scaled_residual_init), (i, d), ('mlp', 'embed'), pdt)
    self.b_out = param(rngs, zeros, (d,), ('embed',), pdt) if m.use_bias else None

  def init_cache(self, batch: int, dtype=None) -> dict[str, jax.Array]:
    """An empty state (the one before a sequence's first token)."""
    i = self.d.shape[0]
    return {'conv': jnp.zeros((batch, self.width - 1, i), dtype or self.dtype),
            'ssm': jnp.zeros((batch, i, self.d_state), jnp.float32)}

  def __call__(self, u: jax.Array, segment_ids: jax.Array | None = None, *,
               cache: dict | None = None):
    """u [B, T, D] -> (out [B, T, D], new cache or None). segment_ids [B, T]: 0 = padding."""
    dt_ = self.dtype
    # 'BTD,DKI->BTKI' (K = 2: x, z)
    xz = project(self, 'w_in', u.astype(dt_), self.w_in[...].astype(dt_))
    if self.b_in is not None:
      xz = xz + self.b_in[...].astype(dt_)
    x, z = constrain(xz[:, :, 0], INNER), constrain(xz[:, :, 1], INNER)
    valid = None if segment_ids is None else (segment_ids != 0)[..., None]
    if valid is not None:
      x = jnp.where(valid, x, 0)
    x, conv_state = causal_conv(
        x, self.conv_w[...], None if self.conv_b is None else self.conv_b[...],
        segment_ids=segment_ids, state=None if cache is None else cache['conv'])
    x = jax.nn.silu(x)
    if valid is not None:
      x = jnp.where(valid, x, 0)

    r, n = self.dt_rank, self.d_state
    proj = project(self, 'w_x', x, self.w_x[...].astype(dt_)).astype(jnp.float32)  # 'BTI,IK->BTK'
    dt = jax.nn.softplus(dense(proj[..., :r], self.w_dt[...].astype(jnp.float32))
                         + self.b_dt[...].astype(jnp.float32))     # 'BTR,RI->BTI'
    b, c = proj[..., r:r + n], proj[..., r + n:]
    a = -jnp.exp(self.a_log[...].astype(jnp.float32))
    reset = None
    if segment_ids is not None:
      # A segment's first token (after the call's first, which continues the cache) restarts.
      reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    y, h = selective_scan(x.astype(jnp.float32), dt, a, b, c,
                          self.d[...].astype(jnp.float32),
                          h0=None if cache is None else cache['ssm'], reset=reset,
                          scan=self.scan)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(dt_)
    if valid is not None:
      y = jnp.where(valid, y, 0)
    out = project(self, 'w_out', constrain(y, INNER), self.w_out[...].astype(dt_))  # 'BTI,ID->BTD'
    if self.b_out is not None:
      out = out + self.b_out[...].astype(dt_)
    new_cache = None
    if cache is not None:
      new_cache = {'conv': conv_state.astype(cache['conv'].dtype), 'ssm': h}
    return constrain(out, R.RESIDUAL), new_cache
