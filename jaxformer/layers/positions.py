"""Position information (CATALOG C1-C7).

Shapes: B batch, T query length, S key length, N heads, H head dim, D model dim, R relative
buckets. Positions are integer arrays [B|1, T]; every function takes explicit positions, so
KV-cached decoding and left-padded prompts use the same code as training.

- C1 sinusoidal (Vaswani et al. 2017, sec. 3.5):
    PE(pos, 2i) = sin(pos / 10000^(2i/D)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/D)).
- C2 learned absolute table (GPT-2, BERT, ViT); `offset` shifts ids (BART, RoBERTa).
- C3 Shaw et al. 2018, eq. 3-5: e_ij = q_i (k_j + a^K_ij)^T / sqrt(H),
    z_i = sum_j alpha_ij (v_j + a^V_ij), a_ij = w_clip(j - i, k), one table per K and V of
    2k+1 rows shared by all heads.
- C4 T5 relative bias (Raffel et al. 2020): a learned scalar per head and log-spaced bucket of
    relative = key_pos - query_pos; the bucket function is Hugging Face's
    `T5Attention._relative_position_bucket`.
- C5 RoPE (Su et al. 2021): the Hugging Face LLaMA "rotate_half" layout, x' = x cos + rot(x) sin,
    rot([x1, x2]) = [-x2, x1], frequencies theta^(-2i/d) on the first d = H * rotary_fraction
    dims. Linear scaling divides positions by the factor (Chen et al. 2023); NTK scaling raises
    the base to theta * factor^(d / (d - 2)) (static NTK-aware scaling, bloc97 2023).
- C6 ALiBi (Press et al. 2022): bias -m_n |t - s| with the geometric slopes of BLOOM's
    `build_alibi_tensor` (also for head counts that are not powers of two).
- C7 NoPE is the absence of all of the above.

Each kind is a `PositionKind` registered under its `model.position.kind` name at the end of its
section; the hooks and how the models call them are in jaxformer/layers/position_registry.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxformer.config import ModelConfig, PositionConfig, fail
from jaxformer.layers import base
from jaxformer.layers.position_registry import PositionKind, register


# ------------------------------------------------------------------ C1 sinusoidal
def sinusoidal(positions: jax.Array, dim: int, *, max_timescale: float = 10000.0,
               interleaved: bool = True) -> jax.Array:
  """Sinusoidal encodings [..., dim] of arbitrary (float or int) positions [...].

  `interleaved=True` is the paper's layout (sin on even, cos on odd channels);
  `interleaved=False` puts all sines first, then all cosines (fairseq / Marian layout).
  """
  if dim % 2:
    raise ValueError(f'sinusoidal positions need an even dim, got {dim}')
  inv = max_timescale ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if interleaved:
    return jnp.stack([sin, cos], axis=-1).reshape(*angles.shape[:-1], dim)
  return jnp.concatenate([sin, cos], axis=-1)


def sinusoidal_table(length: int, dim: int, **kw) -> jax.Array:
  """The [length, dim] table PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(...)."""
  return sinusoidal(jnp.arange(length), dim, **kw)


@register('sinusoidal')
class Sinusoidal(PositionKind):
  """Adds PE(pos) to the token embeddings; no parameters."""

  @classmethod
  def validate(cls, cfg: ModelConfig) -> None:
    # The table is added to the token embeddings, at their width (embed_dim, else d_model).
    field = 'model.embed_dim' if cfg.embed_dim is not None else 'model.d_model'
    if cfg.embed_width % 2:
      fail(field, cfg.embed_width, "must be even for model.position.kind='sinusoidal' "
           '(sine and cosine channels come in pairs)')

  def embed(self, params, positions):
    return sinusoidal(positions, self.cfg.embed_width)


# ------------------------------------------------------------------ C2 learned
class LearnedPositions(nnx.Module):
  """A learned table of `max_length` positions; ids are looked up at `positions + offset`."""

  def __init__(self, max_length: int, dim: int, *, rngs: nnx.Rngs, offset: int = 0,
               init=None, param_dtype=jnp.float32):
    self.max_length = max_length
    self.offset = offset
    init = init if init is not None else base.normal_init(0.02)
    self.table = base.param(rngs, init, (max_length + offset, dim), ('position', 'embed'),
                            param_dtype)

  def __call__(self, positions: jax.Array) -> jax.Array:
    """positions [B|1, T] int -> [B|1, T, D].

    Concrete positions outside [0, max_length) raise; under jit they cannot be checked and
    produce NaN rows instead of silently reusing the last row.
    """
    if not isinstance(positions, jax.core.Tracer):
      p = np.asarray(jax.device_get(positions))
      if p.size and (p.min() < 0 or p.max() >= self.max_length):
        raise ValueError(
            f'position ids range over [{p.min()}, {p.max()}] but the learned position table has '
            f'model.position.max_length={self.max_length} rows; shorten the input or raise '
            'model.position.max_length (and model.max_length)')
    rows = jnp.where(positions < 0, self.table.shape[0], positions + self.offset)
    return jnp.take(self.table[...], rows, axis=0, mode='fill', fill_value=jnp.nan)


@register('learned')
class Learned(PositionKind):
  """Adds a learned row per position (`TokenEmbedder.positions.table`) to the token embeddings."""

  @classmethod
  def validate(cls, cfg: ModelConfig) -> None:
    if cfg.position.max_length < cfg.max_length:
      fail('model.position.max_length', cfg.position.max_length,
           f'must be >= model.max_length={cfg.max_length} for a learned position table')

  def embedding_params(self, *, rngs):
    cfg = self.cfg
    return LearnedPositions(cfg.position.max_length, cfg.embed_width,
                            offset=cfg.position.offset, init=base.normal_init(cfg.init_std),
                            param_dtype=cfg.params_dtype, rngs=rngs)

  def embed(self, params, positions):
    return params(positions)


# ------------------------------------------------------------------ C3 Shaw
def shaw_index(q_positions: jax.Array, kv_positions: jax.Array, max_relative: int) -> jax.Array:
  """Row of the relative table for each (t, s): clip(s - t, -k, k) + k, shape [B|1, T, S]."""
  rel = kv_positions[:, None, :] - q_positions[:, :, None]
  return jnp.clip(rel, -max_relative, max_relative) + max_relative


class ShawRelative(nnx.Module):
  """Clipped relative key and value embeddings w^K, w^V of shape [2k+1, H] (Shaw et al. 2018)."""

  def __init__(self, max_relative: int, head_dim: int, *, rngs: nnx.Rngs, init=None,
               param_dtype=jnp.float32):
    self.max_relative = max_relative
    init = init if init is not None else base.normal_init(0.02)
    shape, names = (2 * max_relative + 1, head_dim), ('position', 'head_dim')
    self.key_table = base.param(rngs, init, shape, names, param_dtype)
    self.value_table = base.param(rngs, init, shape, names, param_dtype)

  def index(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    return shaw_index(q_positions, kv_positions, self.max_relative)

  def key_logits(self, q: jax.Array, index: jax.Array) -> jax.Array:
    """q_i . a^K_ij, unscaled: q [B, T, N, H], index [B|1, T, S] -> [B, N, T, S] (float32)."""
    b, t, n, _ = q.shape
    qr = jnp.einsum('BTNH,RH->BNTR', q, self.key_table[...].astype(q.dtype),
                    preferred_element_type=jnp.float32)
    idx = jnp.broadcast_to(index[:, None], (b, n, t, index.shape[-1]))
    return jnp.take_along_axis(qr, idx, axis=-1)

  def value_term(self, probs: jax.Array, index: jax.Array) -> jax.Array:
    """sum_j p_ij a^V_ij: probs [B, N, T, S], index [B|1, T, S] -> [B, T, N, H] (float32).

    The probabilities are first summed per relative bucket, so no [T, S, H] tensor is built.
    """
    b = probs.shape[0]
    onehot = jax.nn.one_hot(jnp.broadcast_to(index, (b,) + index.shape[1:]),
                            2 * self.max_relative + 1, dtype=jnp.float32)
    per_bucket = jnp.einsum('BNTS,BTSR->BNTR', probs.astype(jnp.float32), onehot)
    return jnp.einsum('BNTR,RH->BTNH', per_bucket, self.value_table[...].astype(jnp.float32))


@register('shaw')
class Shaw(PositionKind):
  """Relative key and value tables in every self-attention layer (`self_attn.shaw`)."""
  attention_features = frozenset({'shaw'})
  shift_invariant = True

  def attention_params(self, *, rngs):
    cfg = self.cfg
    return ShawRelative(cfg.position.shaw_max_relative, cfg.head_dim, rngs=rngs,
                        init=base.normal_init(cfg.init_std), param_dtype=cfg.params_dtype)

  def attention_terms(self, params, q, q_positions, kv_positions, scale):
    """scale * q_i . a^K_ij added to the logits; the value term sum_j p_ij a^V_ij."""
    index = params.index(q_positions, kv_positions)
    return (scale * params.key_logits(q, index),
            functools.partial(params.value_term, index=index))


# ------------------------------------------------------------------ C4 T5
def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
  """T5's bucket of relative = key_pos - query_pos (Hugging Face `_relative_position_bucket`).

  Half of the buckets hold exact distances 0 .. max_exact-1, the rest grow logarithmically up to
  max_distance; bidirectional uses separate halves for keys after the query.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # The large branch is only selected where rel >= max_exact >= 1, so the floor at 1 merely keeps
  # log(0) out of the unselected lanes.
  ratio = jnp.maximum(rel, 1).astype(jnp.float32) / max_exact
  large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


@struct.dataclass
class RelativeBias:
  """An additive attention bias that is a function of (query position, key position): ALiBi
  (`slopes` [N]: -m_n |t - s|) or T5's buckets (`table` [buckets, N]: table[bucket(s - t), n]).

  Calling it gives the dense bias [B|1, N, T, S] (float32) for any positions, so a core that
  never holds the whole [T, S] matrix (ring attention, jaxformer/parallel/ring.py) evaluates it
  block by block with each block's global positions. A pytree: the table is a differentiable
  leaf, the bucket settings static. The head axis is the last axis of every leaf.
  """
  slopes: jax.Array | None = None
  table: jax.Array | None = None
  num_buckets: int = struct.field(pytree_node=False, default=0)
  max_distance: int = struct.field(pytree_node=False, default=0)
  bidirectional: bool = struct.field(pytree_node=False, default=True)

  def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    out = None
    if self.slopes is not None:
      dist = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
      out = -self.slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]
    if self.table is not None:
      rel = kv_positions[:, None, :] - q_positions[:, :, None]
      bucket = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets,
                                        max_distance=self.max_distance)
      values = jnp.take(self.table.astype(jnp.float32), bucket, axis=0)  # [B, T, S, N]
      values = jnp.transpose(values, (0, 3, 1, 2))
      out = values if out is None else out + values
    return out


def alibi(num_heads: int) -> RelativeBias:
  return RelativeBias(slopes=jnp.asarray(alibi_slopes(num_heads), jnp.float32))


class T5RelativeBias(nnx.Module):
  """A learned scalar per (bucket, head), looked up as an additive attention bias."""

  def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool,
               *, rngs: nnx.Rngs, init=None, param_dtype=jnp.float32):
    self.num_buckets, self.max_distance = num_buckets, max_distance
    self.bidirectional = bidirectional
    init = init if init is not None else base.normal_init(0.02)
    self.embedding = base.param(rngs, init, (num_buckets, num_heads), ('position', 'heads'),
                                param_dtype)

  def relative(self) -> RelativeBias:
    return RelativeBias(table=self.embedding[...], num_buckets=self.num_buckets,
                        max_distance=self.max_distance, bidirectional=self.bidirectional)

  def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """positions [B|1, T], [B|1, S] -> bias [B|1, N, T, S] (float32)."""
    return self.relative()(q_positions, kv_positions)


@register('t5')
class T5(PositionKind):
  """One bucket table per stack (`position_bias.embedding`), shared by its layers as in T5;
  bidirectional buckets in an encoder, one-sided in a causal stack."""
  attention_features = frozenset({'bias'})
  shift_invariant = True

  def stack_params(self, *, causal: bool, rngs):
    pc = self.cfg.position
    return T5RelativeBias(pc.num_buckets, pc.max_distance, self.cfg.num_heads,
                          bidirectional=not causal, rngs=rngs)

  def stack_bias(self, params):
    return params.relative()


# ------------------------------------------------------------------ C5 RoPE
def rotary_dim(cfg: PositionConfig, head_dim: int) -> int:
  return int(head_dim * cfg.rotary_fraction)


def rope_frequencies(dim: int, theta: float = 10000.0, *, scaling: str = 'none',
                     factor: float = 1.0) -> jax.Array:
  """Inverse frequencies theta^(-2i/dim), i < dim/2 [dim/2]; NTK scaling enlarges theta."""
  if scaling == 'ntk':
    theta = theta * factor ** (dim / (dim - 2))
  return jnp.asarray(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), jnp.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: PositionConfig,
               head_dim: int | None = None) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B|1, T]; dims past the rotary part pass through."""
  head_dim = head_dim or x.shape[-1]
  rot = rotary_dim(cfg, head_dim)
  inv = rope_frequencies(rot, cfg.rope_theta, scaling=cfg.rope_scaling,
                         factor=cfg.rope_scaling_factor)
  pos = positions.astype(jnp.float32)
  if cfg.rope_scaling == 'linear':
    pos = pos / cfg.rope_scaling_factor
  angles = pos[..., None] * inv                          # [B, T, rot/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, rot]
  x_rot = x[..., :rot].astype(jnp.float32)
  out = x_rot * jnp.cos(angles) + rotate_half(x_rot) * jnp.sin(angles)
  return jnp.concatenate([out.astype(x.dtype), x[..., rot:]], axis=-1)


@register('rope')
class Rope(PositionKind):
  """Rotates q and k in every self-attention layer (k before it enters the KV cache)."""
  shift_invariant = True

  @classmethod
  def validate(cls, cfg: ModelConfig) -> None:
    p = cfg.position
    rot = int(cfg.head_dim * p.rotary_fraction)
    if not 0.0 < p.rotary_fraction <= 1.0:
      fail('model.position.rotary_fraction', p.rotary_fraction, 'must be in (0, 1]')
    if rot % 2:
      fail('model.position.rotary_fraction', p.rotary_fraction,
           f'gives an odd rotary dimension {rot} (head_dim={cfg.head_dim}); RoPE rotates '
           'pairs, so head_dim * rotary_fraction must be even')
    if p.rope_scaling != 'none' and p.rope_scaling_factor < 1.0:
      fail('model.position.rope_scaling_factor', p.rope_scaling_factor, 'must be >= 1')

  def rotate(self, x, positions):
    return apply_rope(x, positions, self.cfg.position, self.cfg.head_dim)


# ------------------------------------------------------------------ C6 ALiBi
def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head slopes [N] as in BLOOM's `build_alibi_tensor` (float64 numpy)."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base_ = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = base_ ** np.arange(1, closest + 1, dtype=np.float64)
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * remaining, 2)])
  return slopes


def alibi_bias(q_positions: jax.Array, kv_positions: jax.Array, num_heads: int) -> jax.Array:
  """-m_n |t - s| as [B|1, N, T, S] (float32).

  Under a causal mask this equals the paper's m_n (s - t) on every visible key, and it differs
  from BLOOM's m_n * s only by a per-row constant, which softmax ignores. The symmetric form is
  the usual bidirectional (encoder) extension.
  """
  return alibi(num_heads)(q_positions, kv_positions)


@register('alibi')
class ALiBi(PositionKind):
  """Fixed per-head slopes, one bias for the whole stack; no parameters."""
  attention_features = frozenset({'bias'})
  shift_invariant = True

  def stack_bias(self, params):
    return alibi(self.cfg.num_heads)


# ------------------------------------------------------------------ C7 NoPE
@register('none')
class NoPositions(PositionKind):
  """NoPE (Kazemnejad et al. 2023): no position information; causal masking alone orders
  tokens, a bidirectional stack sees a bag of tokens."""
  shift_invariant = True
