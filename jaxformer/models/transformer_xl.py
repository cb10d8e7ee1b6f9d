"""Transformer-XL (Dai et al. 2019; CATALOG B14): segment recurrence with relative positions.

A decoder LM that reads a long sequence as consecutive segments of length T. Layer l of segment
tau attends over its memory m_l (the M layer inputs that preceded the segment, no gradient)
followed by the segment itself (paper eq. in sec. 3.2):

    h~ = [SG(m_l) ; h_{l-1}]                                     [B, S = M + T, D]
    q = h_{l-1} W_q,  k = h~ W_k,  v = h~ W_v,  r = R W_{k,R}     R_d = sinusoid(d), d = S-1..0
    A_ij = q_i.k_j (a) + q_i.r_{i-j} (b) + u.k_j (c) + v.r_{i-j} (d)
         = (q_i + u).k_j + (q_i + v).r_{i-j}
    y = softmax(A / sqrt(H) masked) v W_o,   m_l <- last M rows of h~ (the layer's input)

where i - j is the distance M + i - j between query i (window position M + i) and key j. The
(b) + (d) terms are computed for every distance as a [T, S] matrix (row i, column p: distance
S - 1 - p) and moved to key order by the relative shift (a zero column on the left, a reshape to
[S + 1, T], the first row dropped), so no array larger than T x (S + 1) per head exists; the
explicit O(T S) gather of the formula is the test oracle. u and v are per layer (the released
models' `untie_r`). Masking: key j is visible to query i when j <= M + i (causal) and both carry
the same non-zero segment id (0 = padding or an empty memory slot; packed documents keep their
ids across segments). Absolute `positions` are accepted for the 'lm' task and ignored: distances
come from the order in the window, so left padding counts as positions.

The layers of one segment run in a Python loop (depth is small here; the memory of every layer
is an input of its own, unlike the scanned `Stack` of the other families).

Shapes: B batch, T segment length, M memory length, S = M + T keys, D model dim, N heads,
K kv heads (GQA: heads n reads kv head n // (N / K)), H head dim, L layers.

API: `model(tokens, memory=None) -> ModelOutput` with the new memory in `ModelOutput.cache`:
{'hidden': [L, B, M, D], 'segment_ids': [B, M]} (`init_memory(batch)` is the empty memory, which
is what memory=None means). A call longer than the segment length (`segment_length=` argument,
else `model.segment_length`, else the whole input) is cut into equal segments run by a
scan (`nnx.scan`) with the memory carried between them, so the ordinary Trainer trains on rows of
several segments unchanged; memory is not carried across rows (the paper carries it across
consecutive batches of one stream, which needs a data order the Trainer does not keep).
Decoding: the memory replaces the KV cache: call with one new token and the returned memory.

Exact equality (any number of layers): the segment-by-segment computation equals a single
forward over the concatenation in which a query at position t of the segment starting at s0
sees the keys at positions max(0, s0 - M) .. t. Hence with M >= (all tokens before the last
segment) it equals the plain causal forward over the concatenation, and token-by-token decoding
with a long enough memory equals the full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.attention.core import MASKED_LOGIT
from jaxformer.config import ConfigError, ModelConfig, fail
from jaxformer.layers import base
from jaxformer.layers import positions as pos_lib
from jaxformer.layers.ffn import FeedForward
from jaxformer.layers.norms import make_norm
from jaxformer.models.block import SubLayer
from jaxformer.models.common import LMHead, ModelOutput, TokenEmbedder
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain



def check_config(cfg: ModelConfig) -> None:
  if cfg.position.kind != 'none':
    fail('model.position.kind', cfg.position.kind, "must be 'none' for "
         "model.family='transformer_xl' (it has its own relative positions)")


def rel_shift(x: jax.Array) -> jax.Array:
  """[..., T, S] scores by distance column p (distance S - 1 - p) -> [..., T, S] by key j.

  out[i, j] = x[i, j + T - 1 - i] wherever j <= S - T + i (the causal region); other entries
  hold unrelated values and must be masked.
  """
  *lead, t, s = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
  return x.reshape(*lead, s + 1, t)[..., 1:, :].reshape(*lead, t, s)


def relative_logits(q, k, r, u, v) -> jax.Array:
  """Unscaled A = (q + u).k + shift((q + v).r): q [B,T,N,H], k [B,S,N,H], r [S,N,H] (distances
  S-1..0), u, v [N,H] -> float32 [B, N, T, S]."""
  f32 = jnp.float32
  ac = jnp.einsum('BTNH,BSNH->BNTS', q + u, k, preferred_element_type=f32)
  bd = jnp.einsum('BTNH,SNH->BNTS', q + v, r, preferred_element_type=f32)
  return ac + rel_shift(bd)


def relative_embeddings(length: int, dim: int) -> jax.Array:
  """R [length, dim] for distances length-1 .. 0 ([sin; cos] halves, the paper's code)."""
  return pos_lib.sinusoidal(jnp.arange(length - 1, -1, -1), dim, interleaved=False)


class RelativeAttention(nnx.Module):
  """Self-attention over [memory; segment] with the relative position terms (a)-(d)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.d_model = n, k, d
    self.scale = cfg.attention.scale if cfg.attention.scale is not None else h ** -0.5
    self.dtype, pdt = cfg.compute_dtype, cfg.params_dtype
    init = base.make_init(cfg.init, cfg.init_std, in_axis=0, out_axis=(1, 2))
    out_init = base.residual_init(cfg.init, cfg.init_std, cfg.num_layers,
                                  cfg.scaled_residual_init, in_axis=(0, 1), out_axis=2)
    self.wq = base.param(rngs, init, (d, n, h), ('embed', 'heads', 'head_dim'), pdt)
    self.wk = base.param(rngs, init, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.wv = base.param(rngs, init, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pdt)
    self.wr = base.param(rngs, init, (d, n, h), ('embed', 'heads', 'head_dim'), pdt)
    self.wo = base.param(rngs, out_init, (n, h, d), ('heads', 'head_dim', 'embed'), pdt)
    self.u = base.param(rngs, base.normal_init(cfg.init_std), (n, h), ('heads', 'head_dim'), pdt)
    self.v = base.param(rngs, base.normal_init(cfg.init_std), (n, h), ('heads', 'head_dim'), pdt)
    self.dropout = nnx.Dropout(cfg.attention.dropout, rngs=rngs)

  def logits(self, x, kv) -> jax.Array:
    """Scaled scores [B, N, T, S] of the segment x [B, T, D] over kv = [memory; x] [B, S, D]."""
    dt = self.dtype
    g = self.num_heads // self.num_kv_heads
    q = jnp.einsum('BTD,DNH->BTNH', x.astype(dt), self.wq[...].astype(dt))
    k = jnp.repeat(jnp.einsum('BSD,DKH->BSKH', kv.astype(dt), self.wk[...].astype(dt)), g, 2)
    r = jnp.einsum('SD,DNH->SNH', relative_embeddings(kv.shape[1], self.d_model).astype(dt),
                   self.wr[...].astype(dt))
    return self.scale * relative_logits(q, k, r, self.u[...].astype(dt), self.v[...].astype(dt))

  def __call__(self, x, memory, q_segment_ids, kv_segment_ids, *, deterministic: bool = True):
    """x [B, T, D], memory [B, M, D] (normalised like x) -> [B, T, D]."""
    t, m = x.shape[1], memory.shape[1]
    kv = jnp.concatenate([memory.astype(x.dtype), x], axis=1)
    causal = jnp.arange(t)[:, None] + m >= jnp.arange(m + t)[None, :]
    seg = ((q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
           & (q_segment_ids[:, :, None] != 0))
    allowed = (seg & causal[None])[:, None]
    logits = jnp.where(allowed, self.logits(x, kv), MASKED_LOGIT)
    probs = jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)
    probs = self.dropout(probs, deterministic=deterministic)
    dt = self.dtype
    g = self.num_heads // self.num_kv_heads
    v = jnp.repeat(jnp.einsum('BSD,DKH->BSKH', kv.astype(dt), self.wv[...].astype(dt)), g, 2)
    out = jnp.einsum('BNTS,BSNH->BTNH', probs.astype(dt), v)
    y = jnp.einsum('BTNH,NHD->BTD', out, self.wo[...].astype(dt))
    return constrain(y, R.RESIDUAL)


class XLBlock(nnx.Module):
  """Relative self-attention over [memory; segment], then the FFN (residual wiring of SubLayer)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn = RelativeAttention(cfg, rngs=rngs)
    self.attn_sub = SubLayer(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.ffn_sub = SubLayer(cfg, rngs=rngs)

  def __call__(self, x, memory, q_segment_ids, kv_segment_ids, *, deterministic: bool = True):
    sub = self.attn_sub

    def attn_fn(h):
      # The memory holds layer inputs, so it is normalised exactly as the segment is.
      mem = memory if sub.position == 'post' else sub.norm(memory)
      return self.attn(h, mem, q_segment_ids, kv_segment_ids, deterministic=deterministic)

    x = sub(x, attn_fn, deterministic=deterministic)
    return self.ffn_sub(x, lambda h: self.ffn(h, deterministic=deterministic),
                        deterministic=deterministic)


class TransformerXL(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.moe.num_experts:
      raise ConfigError(f'model.moe.num_experts={cfg.moe.num_experts} is invalid: '
                        "model.family='transformer_xl' has dense FFNs only (0)")
    self.cfg = cfg
    self.embedder = TokenEmbedder(cfg, rngs=rngs)
    # Unstacked layers have no 'layers' axis: the metadata says which layer each one is.
    self.layers = nnx.List([base.tag_params(XLBlock(cfg, rngs=rngs), layer=i)
                            for i in range(cfg.num_layers)])
    self.final_norm = make_norm(cfg, rngs=rngs) if cfg.final_norm else None
    self.head = LMHead(cfg, self.embedder.embed, rngs=rngs)

  def init_memory(self, batch: int, dtype=None) -> dict[str, jax.Array]:
    """The empty memory: every slot has segment id 0, so no query sees it."""
    cfg = self.cfg
    return {'hidden': jnp.zeros((cfg.num_layers, batch, cfg.memory_length, cfg.d_model),
                                dtype or cfg.compute_dtype),
            'segment_ids': jnp.zeros((batch, cfg.memory_length), jnp.int32)}

  def run_segment(self, x, memory, segment_ids, *, deterministic: bool = True):
    """One segment of embeddings x [B, T, D] -> (final hidden [B, T, D], new memory)."""
    return run_layers(self.layers, self.cfg.memory_length, x, memory, segment_ids,
                      deterministic=deterministic)

  def __call__(self, tokens, *, segment_ids=None, positions=None, memory=None,
               segment_length: int | None = None, deterministic: bool = True) -> ModelOutput:
    """tokens [B, T] -> ModelOutput(logits [B, T, V] float32, cache = new memory, hidden).

    segment_ids [B, T]: 0 marks padding, packed documents use 1, 2, ... (see the module
    docstring for `positions`, `memory` and the cutting into segments).
    """
    del positions  # relative positions only: distances come from the order in the window
    b, t = tokens.shape
    seg_len = segment_length or self.cfg.segment_length or t
    seg_len = min(seg_len, t)
    if t % seg_len:
      raise ValueError(f'input length {t} is not a multiple of the segment length {seg_len} '
                       '(model.segment_length or the segment_length argument)')
    segment_ids = (jnp.ones((b, t), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
    memory = self.init_memory(b) if memory is None else memory
    x = self.embedder(tokens, None, deterministic=deterministic)
    if seg_len == t:
      h, memory = self.run_segment(x, memory, segment_ids, deterministic=deterministic)
    else:
      h, memory = self._scan_segments(x, memory, segment_ids, seg_len, deterministic)
    if self.final_norm is not None:
      h = self.final_norm(h)
    return ModelOutput(logits=self.head(h), cache=memory, hidden=h)

  def _scan_segments(self, x, memory, segment_ids, seg_len, deterministic):
    b, t, d = x.shape
    n, m = t // seg_len, self.cfg.memory_length
    xs = (x.reshape(b, n, seg_len, d).swapaxes(0, 1),
          segment_ids.reshape(b, n, seg_len).swapaxes(0, 1))
    # Parameters are broadcast; the other state (dropout RNG counters) is carried through the
    # scan so that every segment draws fresh masks.
    state_axes = nnx.StateAxes({nnx.Param: None, ...: nnx.Carry})

    @nnx.scan(in_axes=(state_axes, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(layers, memory, seg):
      h, memory = run_layers(layers, m, seg[0], memory, seg[1], deterministic=deterministic)
      return memory, h

    memory, h = body(self.layers, memory, xs)
    return h.swapaxes(0, 1).reshape(b, t, d), memory


def run_layers(layers, memory_length: int, x, memory, segment_ids, *, deterministic: bool):
  """The layers over one segment x [B, T, D] with memory -> (hidden [B, T, D], new memory)."""
  kv_seg = jnp.concatenate([memory['segment_ids'], segment_ids], axis=1)
  inputs = []
  for layer, mem in zip(layers, memory['hidden']):
    inputs.append(x)
    x = layer(x, mem, segment_ids, kv_seg, deterministic=deterministic)
  hidden = jnp.concatenate([memory['hidden'], jnp.stack(inputs).astype(memory['hidden'].dtype)],
                           axis=2)
  cut = hidden.shape[2] - memory_length
  return x, {'hidden': jax.lax.stop_gradient(hidden[:, :, cut:]),
             'segment_ids': kv_seg[:, cut:]}
