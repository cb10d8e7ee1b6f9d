"""Parameter-efficient fine-tuning modules (CATALOG K), switched on by `model.peft`.

Shapes: B batch, T length, D model dim, E embedding width (D unless model.embed_dim), r adapter
bottleneck (`adapter_dim`), P prefix / prompt length, K kv heads, H head dim, L layers.

  adapter (Houlsby et al. 2019), on the output h [B, T, D] of a sublayer, before its residual add:
      a(h) = h + up(act(down(h)))     down: 'BTD,Dr->BTr' + b_down,  up: 'BTr,rD->BTD' + b_up
    W_up and b_up start at zero, so a(h) = h: a model with adapters starts equal to the one
    without. Parameters per site and layer: 2 D r + r + D.
  prefix (Li & Liang 2021), in every self-attention layer: keys and values [P, K, H] put in
    front of the layer's own, [B, P + S, K, H]; every non-padding query of every packed segment
    sees them (`AttentionMask.kv_prefix`), causality and windows do not apply to them, and they
    carry no position (no RoPE rotation, a zero ALiBi / T5 bias). They are the parameters
    themselves (no MLP reparameterisation, see docs/finetuning.md). Parameters: L 2 P K H.
  prompt (Lester et al. 2021): vectors [P, E] put in front of the token embeddings E[ids] (after
    the sqrt(D) scale, before positions, token types, the embedding norm and dropout); the
    prompt takes positions 0..P-1 and the tokens P..P+T-1. Parameters: P E.

Every parameter carries logical axis names and metadata role 'adapter' / 'prefix' / 'prompt',
which `trainable_filter` selects (the trainable set of PEFT fine-tuning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import base
from jaxformer.layers.ffn import activation
from jaxformer.layers.linear import project

ROLES = ('adapter', 'prefix', 'prompt')


class Adapter(nnx.Module):
  """h + up(act(down(h))) with a zero-initialised up-projection; see the module docstring."""
  PROJECTIONS = ('w_down', 'w_up')  # jaxformer/layers/linear.py `project`

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, r, pdt = cfg.d_model, cfg.peft.adapter_dim, cfg.params_dtype
    init = base.make_init(cfg.init, cfg.init_std)
    self.act = cfg.peft.adapter_activation
    self.dtype = cfg.compute_dtype
    self.w_down = base.param(rngs, init, (d, r), ('embed', None), pdt, role='adapter')
    self.b_down = base.param(rngs, base.zeros, (r,), (None,), pdt, role='adapter')
    self.w_up = base.param(rngs, base.zeros, (r, d), (None, 'embed'), pdt, role='adapter')
    self.b_up = base.param(rngs, base.zeros, (d,), ('embed',), pdt, role='adapter')

  def __call__(self, h: jax.Array) -> jax.Array:
    x = h.astype(self.dtype)
    z = activation(self.act)(project(self, 'w_down', x, self.w_down[...].astype(self.dtype))
                             + self.b_down[...].astype(self.dtype))
    y = project(self, 'w_up', z, self.w_up[...].astype(self.dtype))
    y = y + self.b_up[...].astype(self.dtype)
    return h + y.astype(h.dtype)


class Prefix(nnx.Module):
  """The learned keys and values [P, K, H] of one self-attention layer."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    shape = (cfg.peft.prefix_length, cfg.num_kv_heads, cfg.head_dim)
    names = (None, 'kv_heads', 'head_dim')
    init = base.normal_init(cfg.init_std)
    self.length = cfg.peft.prefix_length
    self.k = base.param(rngs, init, shape, names, cfg.params_dtype, role='prefix')
    self.v = base.param(rngs, init, shape, names, cfg.params_dtype, role='prefix')

  def extend(self, k: jax.Array, v: jax.Array):
    """k, v [B, S, K, H] -> [B, P + S, K, H] with the prefix in front."""
    def put(p, x):
      p = jnp.broadcast_to(p[...].astype(x.dtype)[None], (x.shape[0],) + p.shape)
      return jnp.concatenate([p, x], axis=1)
    return put(self.k, k), put(self.v, v)


def extend_bias(bias, prefix_length: int):
  """An additive bias [B|1, N|1, T, S] with zero columns for the prefix keys in front."""
  if bias is None:
    return None
  pad = [(0, 0)] * (bias.ndim - 1) + [(prefix_length, 0)]
  return jnp.pad(bias, pad)


class Prompt(nnx.Module):
  """The learned prompt [P, E] of a model's input (see the module docstring)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.length = cfg.peft.prompt_length
    self.vectors = base.param(rngs, base.normal_init(cfg.init_std),
                              (self.length, cfg.embed_width), (None, 'embed'),
                              cfg.params_dtype, role='prompt')

  def __call__(self, batch: int, dtype) -> jax.Array:
    """[B, P, E] in `dtype`."""
    return jnp.broadcast_to(self.vectors[...].astype(dtype)[None],
                            (batch,) + self.vectors.shape)


def make_prompt(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Prompt | None:
  return Prompt(cfg, rngs=rngs) if cfg.peft.prompt_length else None


def prompt_inputs(prompt_length: int, segment_ids, positions, *, cache):
  """(segment ids, positions) of the tokens given the prompt in front of them.

  Positions move up by P. Without a cache (a full forward pass) the prompt's own entries are put
  in front: positions 0..P-1 and the segment id of the row (its largest id: 1 for an unpacked
  row, whether padded on the right or the left). With a cache the prompt is already in it
  (`prefill_prompt`).
  """
  p = prompt_length
  positions = positions + p
  if cache is not None:
    return segment_ids, positions
  b = positions.shape[0]
  own = jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype)[None], (b, p))
  positions = jnp.concatenate([own, positions], axis=1)
  if segment_ids is not None:
    row = jnp.max(segment_ids, axis=1, keepdims=True)
    segment_ids = jnp.concatenate([jnp.broadcast_to(row, (b, p)).astype(segment_ids.dtype),
                                   segment_ids], axis=1)
  return segment_ids, positions


# ------------------------------------------------------------------ selection and counts
def is_peft_param(path, value, roles=ROLES) -> bool:
  """An nnx filter: the parameters whose metadata role is one of `roles`."""
  del path
  return isinstance(value, nnx.Param) and value.get_metadata().get('role') in roles


def trainable_filter(roles=ROLES):
  """`nnx.state(model, trainable_filter())`: exactly the PEFT parameters."""
  return lambda path, value: is_peft_param(path, value, tuple(roles))


def expected_counts(cfg: ModelConfig) -> dict[str, int]:
  """The number of parameters of each PEFT role the formulas of the module docstring give."""
  pf = cfg.peft
  fam = cfg.family_spec
  stacks = [(cfg.num_layers, False)]
  if 'cross_adapter' in fam.peft:  # an encoder-decoder: the decoder stack has cross-attention
    stacks.append((cfg.decoder_layers, True))
  d, r = cfg.d_model, pf.adapter_dim
  adapter = prefix = 0
  for layers, cross in stacks:
    sites = [s for s in pf.adapter_sites if s != 'cross_attention' or cross]
    adapter += layers * len(sites) * (2 * d * r + r + d) if r else 0
    prefix += layers * 2 * pf.prefix_length * cfg.num_kv_heads * cfg.head_dim
  return {'adapter': adapter, 'prefix': prefix,
          'prompt': pf.prompt_length * cfg.embed_width}


def counts(model: nnx.Module) -> dict[str, int]:
  """The number of parameters of each PEFT role in `model`."""
  out = {}
  for role in ROLES:
    leaves = jax.tree.leaves(nnx.state(model, trainable_filter((role,))))
    out[role] = sum(int(x.size) for x in leaves)
  return out


def init_prompt_from_tokens(model: nnx.Module, ids: jax.Array) -> None:
  """Sets the prompt to the (scaled) embeddings of token ids [P] (Lester et al.'s vocabulary
  initialisation): the model then equals its base fed those tokens in front of its input."""
  embed = (model.enc_embedder if hasattr(model, 'enc_embedder') else model.embedder).embed
  model.prompt.vectors[...] = embed(ids).astype(model.prompt.vectors.dtype)
