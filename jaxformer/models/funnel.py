"""Funnel-Transformer (Dai et al. 2020, "Funnel-Transformer: Filtering out Sequential Redundancy
for Efficient Language Processing"; CATALOG D8).

An encoder whose blocks of layers read ever shorter sequences. Block b > 0 starts by pooling
its input h [B, L, D] into the query stream of its first attention layer (sec. 2.2):

    u = [h_0 ; h_0 .. h_{L-2}]  (separate_cls, truncate_seq)    u = [h_0 ; h]  (separate_cls)
    u = h                       (no separate_cls)
    pool(h)_k = (u_{2k} + u_{2k+1}) / 2   (a last unpaired u stands alone: ceil(len(u) / 2) rows)
    h' = LN(pool(h) + Attn(q = pool(h), kv = h or pool(h)))          (kv = h when pool_q_only)

so with separate_cls the [CLS] state h_0 is never averaged with another position (window
(h_0, h_0)) and pooled row k >= 1 averages h_{2k-1} and h_{2k}. Each pooled row keeps the
token type and position of the first position of its window; a pooled key is valid when every
position of its window is (min-pooling of the padding mask). All layers are post-LN.

Attention (relative_shift form, appendix A.2.1; q has no bias, k, v and the output do):

    A_ij = s (q_i + r_w).k_j                                            content
         + s [(q_i + r_r).(R(p_i - p'_j) W_r) + (q_i + r_s).e_{same(i, j)}] c_ij
    same(i, j) = type_i == type'_j or either is the [CLS] type 2;  e = seg_embed [2, N, H]
    R(d) = [sin(d w); cos(d w)], w_k = 10000^(-2k/D);  c_ij = 0 for i = 0 or j = 0 with
    separate_cls (the [CLS] row and column get no position or type term), else 1;  s = H^-1/2

where p_i, p'_j are the (pooled) positions of query i and key j. The position term is computed
for every distinct distance d (a [B, N, T, R] tensor, R <= T + S distances) and gathered into
[B, N, T, S] with a static index table; `relative_positions` is that table.

Decoder (`model.num_decoder_layers` > 0; sec. 2.3): the last block's output g [B, L', D] is
up-sampled by repeating each row s = 2^(number of poolings) times,

    up_t = g_{1 + (t-1) // s} (t >= 1), up_0 = g_0      (separate_cls)        up_t = g_{t // s}
    (0 where that row does not exist: positions dropped by truncate_seq)

then x = up + h_first (the first block's output) runs through the decoder layers (full length,
the first block's positions and types). Heads: MLM logits h E^T + b over the decoder output
(HF FunnelForMaskedLM); class logits from tanh(W h_0 + b) of the last block's [CLS] state
(HF FunnelForSequenceClassification, the base model without a decoder).

Pooling stops when a block's input has at most 2 (separate_cls) or 1 rows, as in HF; the
up-sampling stride then counts only the poolings done (HF assumes one per block).

Shapes: B batch, T query length, S key length, L sequence length, D model dim, N heads,
H head dim, R distinct relative distances.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention.core import MASKED_LOGIT
from jaxformer.config import ModelConfig, fail
from jaxformer.layers import base
from jaxformer.layers import positions as pos_lib
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.norms import make_norm
from jaxformer.models.block import SubLayer
from jaxformer.models.common import LMHead, ModelOutput, TokenEmbedder
from jaxformer.models.encoder import Classifier, Pooler
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

CLS_TYPE = 2  # a token type that counts as the same segment as every other (HF's cls_token_type_id)


def check_config(cfg: ModelConfig) -> None:
  f, a = cfg.funnel, cfg.attention
  if cfg.position.kind != 'none':
    fail('model.position.kind', cfg.position.kind, "must be 'none' for model.family='funnel' "
         '(its attention has relative position terms of its own)')
  if not f.block_sizes or any(n <= 0 for n in f.block_sizes):
    fail('model.funnel.block_sizes', f.block_sizes, 'must be a non-empty tuple of positive ints')
  if sum(f.block_sizes) != cfg.num_layers:
    fail('model.num_layers', cfg.num_layers, f'must equal sum(model.funnel.block_sizes)='
         f'{sum(f.block_sizes)} for model.family=\'funnel\' (the encoder depth)')
  if f.block_repeats is not None and (len(f.block_repeats) != len(f.block_sizes)
                                      or any(n <= 0 for n in f.block_repeats)):
    fail('model.funnel.block_repeats', f.block_repeats,
         f'must be None or {len(f.block_sizes)} positive ints (one per block)')
  if cfg.num_decoder_layers is None or cfg.num_decoder_layers < 0:
    fail('model.num_decoder_layers', cfg.num_decoder_layers,
         "must be an int >= 0 for model.family='funnel' (0: the base model, no decoder)")
  if cfg.mlm_head and not cfg.num_decoder_layers and len(f.block_sizes) > 1:
    fail('model.num_decoder_layers', 0, 'must be >= 1 with model.mlm_head: the token-level '
         'logits need the decoder that up-samples the pooled sequence')
  if cfg.num_labels and cfg.num_decoder_layers:
    fail('model.num_decoder_layers', cfg.num_decoder_layers, 'must be 0 with model.num_labels: '
         "the classifier reads the last block's [CLS] state, so a decoder would be unused")
  if cfg.moe.num_experts:
    fail('model.moe.num_experts', cfg.moe.num_experts,
         "must be 0: model.family='funnel' has dense FFNs only")
  if a.num_kv_heads not in (None, a.num_heads):
    fail('model.attention.num_kv_heads', a.num_kv_heads,
         f"must be None or {a.num_heads} for model.family='funnel' (no grouped K/V heads)")
  for name, value, allowed in (('window', a.window, None), ('qk_norm', a.qk_norm, False),
                               ('logit_softcap', a.logit_softcap, None),
                               ('qkv_bias', a.qkv_bias, True), ('out_bias', a.out_bias, True)):
    if value != allowed:
      fail(f'model.attention.{name}', value, f"must be {allowed} for model.family='funnel' "
           '(its attention: no query bias, k / v / output biases, full bidirectional window)')
  if cfg.d_model % 2:
    fail('model.d_model', cfg.d_model, 'must be even (sinusoidal relative positions)')


# ------------------------------------------------------------------ pooling and up-sampling
def _windows(x: jax.Array, separate_cls: bool, truncate: bool) -> jax.Array:
  """[B, L, ...] -> [B, ceil(len(u) / 2), 2, ...]: the pooling windows of u (module docstring);
  an unpaired last row is paired with itself."""
  if separate_cls:
    x = jnp.concatenate([x[:, :1], x[:, :-1] if truncate else x], axis=1)
  if x.shape[1] % 2:
    x = jnp.concatenate([x, x[:, -1:]], axis=1)
  return x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])


def mean_pool(x, *, separate_cls: bool, truncate: bool) -> jax.Array:
  """[B, L, D] -> [B, L', D]: the mean of each window (the query stream of a pooling layer)."""
  return _windows(x, separate_cls, truncate).mean(axis=2)


def first_pool(x, *, separate_cls: bool, truncate: bool) -> jax.Array:
  """[B, L, ...] -> [B, L', ...]: the first row of each window (token types, positions)."""
  return _windows(x, separate_cls, truncate)[:, :, 0]


def all_pool(valid, *, separate_cls: bool, truncate: bool) -> jax.Array:
  """[B, L] bool -> [B, L']: a pooled key is valid when its whole window is (min-pooling)."""
  return jnp.all(_windows(valid, separate_cls, truncate), axis=2)


def upsample(g: jax.Array, stride: int, length: int, *, separate_cls: bool) -> jax.Array:
  """[B, L', D] -> [B, length, D]: row t reads g at `upsample_index` (0 where it is -1)."""
  idx = upsample_index(stride, length, g.shape[1], separate_cls=separate_cls)
  out = g[:, np.maximum(idx, 0)]
  return jnp.where((idx >= 0)[None, :, None], out, jnp.zeros((), g.dtype))


def upsample_index(stride: int, length: int, pooled: int, *, separate_cls: bool) -> np.ndarray:
  """[length] row of the pooled sequence each position repeats (-1: none, a truncated tail)."""
  t = np.arange(length)
  idx = np.where(t == 0, 0, 1 + (t - 1) // stride) if separate_cls else t // stride
  return np.where(idx < pooled, idx, -1)


@dataclasses.dataclass(frozen=True)
class Side:
  """What attention needs about one side (queries or keys) of a sequence of length L:
  positions [L] (static numpy), token types [B, L], valid (non-padding) [B, L]."""
  positions: np.ndarray
  types: jax.Array
  valid: jax.Array

  def pool(self, separate_cls: bool, truncate: bool) -> 'Side':
    kw = dict(separate_cls=separate_cls, truncate=truncate)
    return Side(pool_positions(self.positions, **kw), first_pool(self.types, **kw),
                all_pool(self.valid, **kw))


def pool_positions(pos: np.ndarray, *, separate_cls: bool, truncate: bool) -> np.ndarray:
  """`first_pool` of static positions [L] (numpy, so distances stay known at trace time)."""
  if separate_cls:
    pos = np.concatenate([pos[:1], pos[:-1] if truncate else pos])
  return pos[::2]


def relative_positions(q_pos: np.ndarray, k_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distances [R], index [T, S]): distances[index[i, j]] = q_pos[i] - k_pos[j]."""
  dist = q_pos[:, None] - k_pos[None, :]
  table, index = np.unique(dist, return_inverse=True)
  return table, index.reshape(dist.shape)


# ------------------------------------------------------------------ layers
class FunnelAttention(nnx.Module):
  """Multi-head attention with Funnel's relative position and token-type terms."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.d_model, self.separate_cls = d, cfg.funnel.separate_cls
    self.scale = cfg.attention.scale if cfg.attention.scale is not None else h ** -0.5
    self.dtype, pdt = cfg.compute_dtype, cfg.params_dtype
    init = base.make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2))
    out_init = base.residual_init(cfg.init, cfg.init_std, cfg.num_layers,
                                  cfg.scaled_residual_init, in_axis=(0, 1), out_axis=2)
    small = base.normal_init(cfg.init_std)
    proj = ('embed', 'heads', 'head_dim')
    self.wq = base.param(rngs, init, (d, n, h), proj, pdt)
    self.wk = base.param(rngs, init, (d, n, h), proj, pdt)
    self.wv = base.param(rngs, init, (d, n, h), proj, pdt)
    self.bk = base.param(rngs, base.zeros, (n, h), ('heads', 'head_dim'), pdt, role='bias')
    self.bv = base.param(rngs, base.zeros, (n, h), ('heads', 'head_dim'), pdt, role='bias')
    self.wo = base.param(rngs, out_init, (n, h, d), ('heads', 'head_dim', 'embed'), pdt)
    self.bo = base.param(rngs, base.zeros, (d,), ('embed',), pdt)
    self.r_kernel = base.param(rngs, init, (d, n, h), proj, pdt)
    # The content, position and token-type biases of the query (the paper's u, v and s).
    for name in ('r_w_bias', 'r_r_bias', 'r_s_bias'):
      setattr(self, name, base.param(rngs, small, (n, h), ('heads', 'head_dim'), pdt,
                                     role='bias'))
    self.seg_embed = base.param(rngs, small, (2, n, h), (None, 'heads', 'head_dim'), pdt)
    self.dropout = nnx.Dropout(cfg.attention.dropout, rngs=rngs)

  def logits(self, x, kv, q: Side, k: Side) -> jax.Array:
    """Scaled, unmasked scores [B, N, T, S] of queries x [B, T, D] over keys kv [B, S, D]."""
    dt, f32 = self.dtype, jnp.float32
    w = lambda p: p[...].astype(dt)  # noqa: E731
    qh = jnp.einsum('BTD,DNH->BTNH', x.astype(dt), w(self.wq))
    kh = jnp.einsum('BSD,DNH->BSNH', kv.astype(dt), w(self.wk)) + w(self.bk)
    content = jnp.einsum('BTNH,BSNH->BNTS', qh + w(self.r_w_bias), kh, preferred_element_type=f32)
    table, index = relative_positions(q.positions, k.positions)
    r = pos_lib.sinusoidal(table, self.d_model, interleaved=False).astype(dt)
    r_head = jnp.einsum('RD,DNH->RNH', r, w(self.r_kernel))
    by_distance = jnp.einsum('BTNH,RNH->BNTR', qh + w(self.r_r_bias), r_head,
                             preferred_element_type=f32)
    position = by_distance[:, :, np.arange(index.shape[0])[:, None], index]
    by_type = jnp.einsum('BTNH,ENH->BNTE', qh + w(self.r_s_bias), w(self.seg_embed),
                         preferred_element_type=f32)
    same = ((q.types[:, :, None] == k.types[:, None, :]) | (q.types == CLS_TYPE)[:, :, None]
            | (k.types == CLS_TYPE)[:, None, :])
    token_type = jnp.where(same[:, None], by_type[..., 1:], by_type[..., :1])
    relative = position + token_type
    if self.separate_cls:
      relative = relative * np.pad(np.ones((index.shape[0] - 1, index.shape[1] - 1), np.float32),
                                   ((1, 0), (1, 0)))
    return self.scale * (content + relative)

  def __call__(self, x, kv, q: Side, k: Side, *, deterministic: bool = True):
    """x [B, T, D] attends to kv [B, S, D] -> [B, T, D]."""
    allowed = k.valid[:, None, None, :]
    logits = jnp.where(allowed, self.logits(x, kv, q, k), MASKED_LOGIT)
    probs = jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)
    probs = self.dropout(probs, deterministic=deterministic)
    dt = self.dtype
    v = jnp.einsum('BSD,DNH->BSNH', kv.astype(dt), self.wv[...].astype(dt)) + self.bv[...].astype(dt)
    out = jnp.einsum('BNTS,BSNH->BTNH', probs.astype(dt), v)
    y = jnp.einsum('BTNH,NHD->BTD', out, self.wo[...].astype(dt)) + self.bo[...].astype(dt)
    return constrain(y, R.RESIDUAL)


class FunnelLayer(nnx.Module):
  """Funnel attention, then the FFN (residual and norm wiring of SubLayer)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn = FunnelAttention(cfg, rngs=rngs)
    self.attn_sub = SubLayer(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.ffn_sub = SubLayer(cfg, rngs=rngs)

  def __call__(self, x, kv, q: Side, k: Side, *, deterministic: bool = True):
    """x [B, T, D] (the residual stream) attends to kv [B, S, D], or to itself if kv is None."""
    sub = self.attn_sub

    def attn_fn(h):
      keys = h if kv is None else (kv if sub.position == 'post' else sub.norm(kv))
      return self.attn(h, keys, q, k, deterministic=deterministic)

    x = sub(x, attn_fn, deterministic=deterministic)
    return self.ffn_sub(x, lambda h: self.ffn(h, deterministic=deterministic),
                        deterministic=deterministic)


class Funnel(nnx.Module):
  """Returns MLM logits when `model.mlm_head`, else class logits when `model.num_labels`, else the
  final hidden states (decoder output, or the last block's with no decoder) in `logits`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    f = cfg.funnel
    self.repeats = tuple(f.block_repeats or (1,) * len(f.block_sizes))
    self.embedder = TokenEmbedder(cfg, rngs=rngs)
    # Unstacked layers have no 'layers' axis: the metadata says which layer each one is.
    index = iter(range(cfg.num_layers + cfg.num_decoder_layers))
    layer = lambda: base.tag_params(FunnelLayer(cfg, rngs=rngs), layer=next(index))  # noqa: E731
    self.blocks = nnx.List([nnx.List([layer() for _ in range(n)]) for n in f.block_sizes])
    self.decoder = nnx.List([layer() for _ in range(cfg.num_decoder_layers)])
    self.final_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.head = LMHead(cfg, self.embedder.embed, rngs=rngs) if cfg.mlm_head else None
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.num_labels else None
    self.classifier = Classifier(cfg, rngs=rngs) if cfg.num_labels else None

  def encode(self, x, side: Side, *, deterministic: bool = True):
    """Embeddings x [B, T, D] -> (last block output [B, T', D], first block output [B, T, D],
    number of poolings)."""
    f = self.cfg.funnel
    pools, first = 0, None
    for b, block in enumerate(self.blocks):
      pool = b > 0 and x.shape[1] > (2 if f.separate_cls else 1)
      for i, layer in enumerate(block):
        for r in range(self.repeats[b]):
          if pool and i == r == 0:
            q = mean_pool(x, separate_cls=f.separate_cls, truncate=f.truncate_seq)
            q_side = side.pool(f.separate_cls, f.truncate_seq)
            if f.pool_q_only:
              x = layer(q, x, q_side, side, deterministic=deterministic)
            else:
              x = layer(q, None, q_side, q_side, deterministic=deterministic)
            side, pools = q_side, pools + 1
          else:
            x = layer(x, None, side, side, deterministic=deterministic)
      if b == 0:
        first = x
    return x, first, pools

  def __call__(self, tokens, *, segment_ids=None, token_types=None,
               deterministic: bool = True) -> ModelOutput:
    """tokens [B, T] -> ModelOutput. segment_ids [B, T]: 0 marks padding (packing is refused);
    token_types [B, T] (default 0): type 2 marks [CLS] (the same segment as every token)."""
    cfg = self.cfg
    b, t = tokens.shape
    if t > cfg.max_length:
      raise ValueError(f'sequence length {t} exceeds model.max_length={cfg.max_length}')
    valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
    types = jnp.zeros((b, t), jnp.int32) if token_types is None else token_types
    side = Side(np.arange(t), types, valid)
    x = self.embedder(tokens, None, deterministic=deterministic)
    h, first, pools = self.encode(x, side, deterministic=deterministic)
    if len(self.decoder):
      h = first + upsample(h, 2 ** pools, t, separate_cls=cfg.funnel.separate_cls)
      for layer in self.decoder:
        h = layer(h, None, side, side, deterministic=deterministic)
    if self.final_norm is not None:
      h = self.final_norm(h)
    pooled = self.pooler(h) if self.pooler is not None else None
    if self.head is not None:
      logits = self.head(h)
    elif self.classifier is not None:
      logits = self.classifier(pooled, deterministic=deterministic)
    else:
      logits = h
    return ModelOutput(logits=logits, hidden=h, pooled=pooled)
