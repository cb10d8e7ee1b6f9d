"""Multi-head attention with projections, positions and a KV cache (Vaswani et al. 2017, sec. 3.2).

    head_n = core(x W^Q_n, kv W^K_{n // G}, kv W^V_{n // G}),   y = sum_n head_n W^O_n

Shapes: B batch, T query length, S key length, D model dim, N query heads, K kv heads
(MHA K = N, GQA 1 < K < N, MQA K = 1), H head dim. Weights: W^Q [D, N, H], W^K / W^V [D, K, H],
W^O [N, H, D]. The core (`cfg.attention.kind` / `impl`) comes from the registry, so every block
takes every kind. Optional: QK-norm (RMSNorm over H on q and k, Dehghani et al. 2023); the
position kind's attention hooks in self-attention (jaxformer/layers/position_registry.py: RoPE's
`rotate` of q and k, Shaw's `attention_terms`, whose tables live under the kind's name); an
additive bias (ALiBi, T5) given by the caller. With `model.peft.prefix_length` P, every
self-attention layer puts P learned keys and values in front of its own (prefix tuning,
jaxformer/layers/peft.py `Prefix`; the mask's `kv_prefix`); they are not written to the cache.

KV cache (explicit and functional, a dict pytree that works under jit and scan):
  self-attention  {'k', 'v': [B, S, K, H], 'segment_ids': [B, S] int32 (0 = empty slot),
                   'positions': [B, S] int32, 'index': int32 scalar (next slot)}
  cross-attention {'k', 'v', 'segment_ids', 'positions'} from `precompute_cross`, no 'index'.
A call with a self-attention cache writes its T new keys/values (after RoPE at the query
positions) into slots [index, index + T) and attends over the whole cache; empty slots and
left padding carry segment id 0 and are never seen. Query positions default to index + arange(T);
left-padded batched prompts pass per-row `mask.q_positions` and `mask.q_segment_ids`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from jaxformer.attention import registry
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import ModelConfig
from jaxformer.layers import base, peft, position_registry
from jaxformer.layers.linear import project
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain


class _HeadRMSNorm(nnx.Module):
  """RMSNorm over the last (head) axis for QK-norm, computed in float32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = base.param(rngs, base.ones, (dim,), ('head_dim',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def needed_features(cfg: ModelConfig, *, cross: bool, causal: bool) -> set[str]:
  """The registry features an attention layer of this model asks its core for."""
  a = cfg.attention
  needed = {'padding'}
  if causal:
    needed.add('causal')
  if cross:
    needed.add('cross')
  else:
    if a.window is not None:
      needed.add('window')
    needed |= position_registry.lookup(cfg.position.kind).attention_features
  if a.logit_softcap is not None:
    needed.add('softcap')
  if a.dropout > 0.0:
    needed.add('dropout')
  if cfg.peft.prefix_length and not cross:
    needed.add('prefix')
  return needed


class Attention(nnx.Module):
  """Self- or cross-attention used by every model family; see the module docstring."""
  PROJECTIONS = ('wq', 'wk', 'wv', 'wo')  # jaxformer/layers/linear.py `project`

  def __init__(self, cfg: ModelConfig, *, cross: bool = False, causal: bool = False,
               rngs: nnx.Rngs):
    if cross and causal:
      raise ValueError('cross-attention cannot be causal: the keys come from another sequence')
    a = cfg.attention
    if cross and a.cross_kind is not None and a.cross_kind != a.kind:
      a = dataclasses.replace(a, kind=a.cross_kind, options=FrozenDict())
    elif cross and a.cross_kind is not None and 'cross' not in registry.lookup(
        a.kind, a.impl).features:
      # The same kind through an impl that serves self-attention only (the context-parallel
      # 'ring'): cross-attention layers take the kind's reference impl.
      a = dataclasses.replace(a, impl='xla', options=FrozenDict())
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    needed = needed_features(cfg, cross=cross, causal=causal)
    a = registry.resolve(a, needed, cfg.compute_dtype)  # impl 'auto' -> a concrete impl
    self.attention_cfg = a
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.cross, self.causal = cross, causal
    self.window = None if cross else a.window
    self.position = position_registry.of(cfg, cross=cross)
    self.scale = a.scale if a.scale is not None else h ** -0.5
    self.dtype, pdt = cfg.compute_dtype, cfg.params_dtype

    core_cls = registry.lookup(a.kind, a.impl)
    self.uses_projections = getattr(core_cls, 'uses_projections', True)
    self.core = registry.build(a, num_heads=n, num_kv_heads=k, head_dim=h, dtype=self.dtype,
                               param_dtype=pdt, rngs=rngs, max_length=cfg.max_length,
                               causal=causal, cross=cross, needed=needed)
    if self.uses_projections:
      init = base.make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2))
      out_init = base.residual_init(cfg.init, cfg.init_std, cfg.num_layers,
                                    cfg.scaled_residual_init, in_axis=(0, 1), out_axis=2)
      self.wq = base.param(rngs, init, (d, n, h), ('embed', 'heads', 'head_dim'), pdt)
      self.wk = base.param(rngs, init, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
      self.wv = base.param(rngs, init, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
      self.wo = base.param(rngs, out_init, (n, h, d), ('heads', 'head_dim', 'embed'), pdt)
      if a.qkv_bias:  # [N, H] like a matrix by its names: the role keeps weight decay off
        self.bq = base.param(rngs, base.zeros, (n, h), ('heads', 'head_dim'), pdt, role='bias')
        self.bk = base.param(rngs, base.zeros, (k, h), ('kv_heads', 'head_dim'), pdt,
                             role='bias')
        self.bv = base.param(rngs, base.zeros, (k, h), ('kv_heads', 'head_dim'), pdt,
                             role='bias')
      else:
        self.bq = self.bk = self.bv = None
      self.bo = base.param(rngs, base.zeros, (d,), ('embed',), pdt) if a.out_bias else None
    else:
      self.wq = self.wk = self.wv = self.wo = self.bq = self.bk = self.bv = self.bo = None
    if a.qk_norm:
      self.q_norm = _HeadRMSNorm(h, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
      self.k_norm = _HeadRMSNorm(h, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
    else:
      self.q_norm = self.k_norm = None
    # The kind's per-layer parameters live under its name (`shaw.key_table`).
    if hasattr(self, self.position.name):
      raise ValueError(f'position kind {self.position.name!r} clashes with an attribute of '
                       'Attention; register it under another name')
    self.prefix = (peft.Prefix(cfg, rngs=rngs) if cfg.peft.prefix_length and not cross
                   else None)
    position_params = self.position.attention_params(rngs=rngs)
    if position_params is not None:
      setattr(self, self.position.name, position_params)
    if a.dropout > 0.0:
      try:
        self.dropout_rngs = rngs['dropout'].fork()
      except KeyError as e:
        raise ValueError('model.attention.dropout > 0 needs a "dropout" (or default) stream in '
                         'the nnx.Rngs given to Attention') from e
    else:
      self.dropout_rngs = nnx.data(None)

  # ---------------------------------------------------------------- projections
  def _proj(self, x, name, b):
    y = project(self, name, x, getattr(self, name)[...].astype(self.dtype))  # 'BTD,DNH->BTNH'
    return y if b is None else y + b[...].astype(self.dtype)

  def _keys_values(self, src: jax.Array):
    src = src.astype(self.dtype)
    k = self._proj(src, 'wk', self.bk)
    v = self._proj(src, 'wv', self.bv)
    if self.k_norm is not None:
      k = self.k_norm(k)
    return (constrain(k, R.KEYS),
            constrain(v, R.KEYS))

  # ---------------------------------------------------------------- caches
  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """An empty self-attention cache of `max_len` slots (all segment ids 0)."""
    if self.cross:
      raise ValueError('cross-attention caches come from precompute_cross(encoder_states)')
    registry.require(self.attention_cfg, {'decode'})
    dtype = dtype or self.dtype
    if hasattr(self.core, 'init_state'):
      return {'core': self.core.init_state(batch, max_len, dtype),
              'index': jnp.zeros((), jnp.int32)}
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
            'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
            'positions': jnp.zeros((batch, max_len), jnp.int32),
            'index': jnp.zeros((), jnp.int32)}

  def precompute_cross(self, kv: jax.Array, kv_segment_ids: jax.Array | None = None,
                       dtype=None) -> dict[str, jax.Array]:
    """Encoder keys/values [B, S, K, H] computed once for every decoding step."""
    if not self.cross:
      raise ValueError('precompute_cross is for cross-attention layers')
    k, v = self._keys_values(kv)
    b, s = kv.shape[:2]
    if kv_segment_ids is None:
      kv_segment_ids = jnp.ones((b, s), jnp.int32)
    dtype = dtype or self.dtype
    return {'k': k.astype(dtype), 'v': v.astype(dtype),
            'segment_ids': kv_segment_ids.astype(jnp.int32),
            'positions': jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))}

  # ---------------------------------------------------------------- call
  def __call__(self, x: jax.Array, mask: AttentionMask | None = None, *,
               kv: jax.Array | None = None, bias=None, cache: dict | None = None,
               deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new cache or None).

    Args:
      mask: segment ids / positions / extra mask; the layer adds its own causality and window.
      kv: encoder states [B, S, D] for cross-attention without a cache.
      bias: additive bias [B|1, N|1, T, S], or a callable (q_positions [B|1, T],
        kv_positions [B|1, S]) -> bias, called with the positions actually attended (the cache
        slots when decoding), e.g. `functools.partial(alibi_bias, num_heads=N)`.
      cache: a dict from `init_cache` (self) or `precompute_cross` (cross).
      deterministic: False enables attention dropout (stream 'dropout' of the layer's rngs).
    """
    mask = AttentionMask() if mask is None else mask
    b, t, _ = x.shape
    x = x.astype(self.dtype)
    if not self.uses_projections:
      return self._mix(x, mask, cache, deterministic)
    q = self._proj(x, 'wq', self.bq)
    if self.q_norm is not None:
      q = self.q_norm(q)
    new_cache = cache
    if self.cross:
      if cache is not None:
        k, v = cache['k'].astype(self.dtype), cache['v'].astype(self.dtype)
        mask = mask.replace(kv_segment_ids=cache['segment_ids'])
      elif kv is None:
        raise ValueError('cross-attention needs kv= (encoder states) or a precompute_cross cache')
      else:
        k, v = self._keys_values(kv)
      qpos, kpos = mask.positions(t, k.shape[1])
    else:
      k, v = self._keys_values(x)
      if cache is None:
        qpos = mask.q_positions if mask.q_positions is not None else jnp.arange(t)[None]
        kpos = mask.kv_positions if mask.kv_positions is not None else qpos
        mask = mask.replace(q_positions=qpos, kv_positions=kpos)
      else:
        index = cache['index']
        qpos = mask.q_positions
        if qpos is None:
          qpos = (index + jnp.arange(t, dtype=jnp.int32))[None]
      q = self.position.rotate(q, qpos)
      k = self.position.rotate(k, qpos if cache is not None else kpos)
      if cache is not None and 'core' in cache:
        return self._stateful_step(q, k, v, mask, qpos, cache)
      if cache is not None:
        new_cache, k, v, mask = self._write(cache, k, v, mask, qpos)
        kpos = mask.kv_positions
      mask = mask.replace(causal=mask.causal or self.causal,
                          window=self.window if self.window is not None else mask.window)
    q = constrain(q, R.QUERIES)

    if callable(bias) and not getattr(self.core, 'takes_relative_bias', False):
      bias = bias(qpos, kpos)  # such cores evaluate it block by block
    extra = {}
    key_term, value_bias_fn = self.position.attention_terms(
        getattr(self, self.position.name, None), q, qpos, kpos, self.scale)
    if key_term is not None:
      bias = key_term if bias is None else bias + key_term
    if value_bias_fn is not None:
      extra['value_bias_fn'] = value_bias_fn
    if self.prefix is not None:
      k, v = self.prefix.extend(k, v)
      bias = peft.extend_bias(bias, self.prefix.length)
      mask = mask.replace(kv_prefix=self.prefix.length)
    rng = None
    if not deterministic and self.dropout_rngs is not None:
      rng = self.dropout_rngs()
    out = self.core(q, k, v, mask, bias=bias, deterministic=deterministic, dropout_rng=rng,
                    **extra)
    return self._output(out), new_cache

  def _output(self, out):
    # Heads split and the length whole, as the queries: with sequence parallelism the result is
    # length-split (RESIDUAL), and without this pin XLA carries that layout back into the
    # attention core's backward pass and reshards the [B, K, G, T, S] probabilities there.
    out = constrain(out, R.QUERIES)
    y = project(self, 'wo', out, self.wo[...].astype(self.dtype), 2)  # 'BTNH,NHD->BTD'
    if self.bo is not None:
      y = y + self.bo[...].astype(self.dtype)
    return constrain(y, R.RESIDUAL)

  def _stateful_step(self, q, k, v, mask: AttentionMask, qpos, cache):
    """Decoding with a core that keeps its own state (see the registry's protocol)."""
    b, t = q.shape[:2]
    qseg = mask.q_segment_ids if mask.q_segment_ids is not None else jnp.ones((b, t), jnp.int32)
    step_mask = AttentionMask(q_segment_ids=qseg, kv_segment_ids=qseg, q_positions=qpos,
                              kv_positions=qpos, causal=True, window=self.window)
    out, state = self.core(q, k, v, step_mask, state=cache['core'])
    return self._output(out), {'core': state, 'index': cache['index'] + t}

  def _mix(self, x, mask: AttentionMask, cache, deterministic):
    """A projection-free core (`uses_projections = False`): x itself is q = k = v."""
    if self.cross:
      raise ValueError(f'attention kind {self.attention_cfg.kind!r} mixes tokens of its own '
                       'input and cannot be used for cross-attention')
    if cache is not None:
      raise ValueError(f'attention kind {self.attention_cfg.kind!r} has no decoding cache')
    mask = mask.replace(causal=mask.causal or self.causal)
    xs = x[:, :, None, :]
    out = self.core(xs, xs, xs, mask, deterministic=deterministic)
    return constrain(out[:, :, 0, :], R.RESIDUAL), None

  def _write(self, cache, k, v, mask: AttentionMask, qpos):
    """Writes T new entries at cache['index']; returns (cache, k_all, v_all, mask over slots)."""
    b, t = k.shape[:2]
    index = cache['index']
    max_len = cache['k'].shape[1]
    if not isinstance(index, jax.core.Tracer) and int(index) + t > max_len:
      raise ValueError(f'KV cache overflow: writing {t} tokens at slot {int(index)} of a cache '
                       f'with {max_len} slots; allocate init_cache(..., max_len) large enough')
    qseg = mask.q_segment_ids
    if qseg is None:
      qseg = jnp.ones((b, t), jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    put = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, new.astype(buf.dtype), (zero, index) + (zero,) * (buf.ndim - 2))
    new_cache = {
        'k': put(cache['k'], k), 'v': put(cache['v'], v),
        'segment_ids': put(cache['segment_ids'], qseg),
        'positions': put(cache['positions'], jnp.broadcast_to(qpos, (b, t))),
        'index': index + t,
    }
    mask = AttentionMask(q_segment_ids=qseg, kv_segment_ids=new_cache['segment_ids'],
                         q_positions=qpos, kv_positions=new_cache['positions'],
                         extra=mask.extra, causal=mask.causal, window=mask.window)
    return (new_cache, new_cache['k'].astype(self.dtype), new_cache['v'].astype(self.dtype),
            mask)
