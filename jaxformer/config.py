"""Typed, validated model configuration.

`ml_collections.ConfigDict` lives only at the edge (config files, command-line overrides).
`ModelConfig.from_dict` turns the `config.model` section into frozen dataclasses and validates
every field before a module is built, so a bad value fails with the field's dotted path and the
allowed values instead of a shape error deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field and what is allowed."""


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
  raise ConfigError(f'{field}={value!r} is invalid: {allowed}')


def parse_config_arg(arg: str | None, options: Mapping[str, tuple[str, Any]]) -> dict[str, str]:
  """The `:key=value,...` argument of `--config=file.py:arg`, checked against `options`.

  `options` maps each option to (default, allowed values or None for any value). Raises
  ConfigError naming the argument, what is wrong and the expected form.
  """
  def describe() -> str:
    return ', '.join(f'{k} (one of {list(allowed)}, default {d!r})' if allowed is not None
                     else f'{k} (default {d!r})' for k, (d, allowed) in options.items())

  out = {k: d for k, (d, _) in options.items()}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError(f'config argument {arg!r} is invalid: {item!r} is not key=value; the '
                        f"form is ':key=value,key=value' (e.g. ':size=tiny'), the options are "
                        f'{describe()}')
    if key not in options:
      raise ConfigError(f'config argument {arg!r} is invalid: unknown option {key!r}; the '
                        f'options are {describe()}')
    allowed = options[key][1]
    if allowed is not None and value not in allowed:
      raise ConfigError(f'config argument {arg!r} is invalid: {key}={value!r}; allowed values '
                        f'are {list(allowed)}')
    out[key] = value
  return out


def check_choice(field: str, value: Any, choices) -> None:
  if value not in choices:
    fail(field, value, f'allowed values are {sorted(choices)}')


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
NORMS = ('layernorm', 'rmsnorm', 'scalenorm')
NORM_POSITIONS = ('pre', 'post', 'sandwich')
ACTIVATIONS = ('relu', 'gelu', 'gelu_tanh', 'silu', 'tanh')
ROPE_SCALINGS = ('none', 'linear', 'ntk')
ROUTERS = ('topk', 'switch', 'hash', 'soft')
# How routed tokens reach their experts (jaxformer.layers.moe_dispatch); 'auto' is the router's
# historical one: dense for topk and hash, capacity for switch.
DISPATCHES = ('auto', 'dense', 'capacity', 'ragged')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_attention_out')
INITS = ('normal', 'xavier', 'lecun')


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Self/cross attention. `kind` and `impl` select an entry of `jaxformer.attention.registry`.

  `window` is a sliding window (Mistral): a query at position t sees keys at positions
  t - window < s <= t (and s >= t - window + 1 in the bidirectional case, symmetric).
  `scale=None` means head_dim ** -0.5; T5 uses 1.0.
  `options` holds kind-specific settings (e.g. number of random features) that the registry
  entry validates itself. `cross_kind` is the kind of cross-attention layers (encoder-decoder
  families); None uses `kind` (with its options). Efficient self-attention kinds that cannot
  attend to another sequence are combined with `cross_kind='dot_product'`; with the kind itself
  through an impl that serves self-attention only (the context-parallel 'ring'), the
  cross-attention layers use the kind's 'xla' impl.
  """
  kind: str = 'dot_product'
  impl: str = 'xla'
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  logit_softcap: float | None = None
  dropout: float = 0.0
  window: int | None = None
  scale: float | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  cross_kind: str | None = None


@dataclasses.dataclass(frozen=True)
class PositionConfig:
  """Position information (CATALOG C1-C7); `kind` selects an entry of
  `jaxformer.layers.position_registry`, which also validates the kind's own fields.

  sinusoidal / learned are added to the embeddings; rope rotates q and k; alibi and t5 are an
  additive attention bias computed once per stack; shaw adds clipped relative key/value
  embeddings inside every attention layer; none is NoPE.
  `offset` shifts learned position ids (BART and RoBERTa start at 2).
  """
  kind: str = 'rope'
  max_length: int = 2048
  offset: int = 0
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_original_max_length: int | None = None
  num_buckets: int = 32
  max_distance: int = 128
  shaw_max_relative: int = 16


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """Position-wise feed-forward: act(x W1) W2, or act(x W1) * (x W3) W2 when gated.

  SwiGLU = silu + gated, GeGLU = gelu + gated, ReGLU = relu + gated.
  `hidden_dim=None` means 4 * d_model (8/3 * d_model rounded up to 8 when gated).
  `chunk_size` applies the FFN to chunks of that many positions in turn (Reformer's chunked
  FFN: the [T, F] hidden activation is never whole); None applies it at once.
  """
  activation: str = 'gelu'
  gated: bool = False
  hidden_dim: int | None = None
  bias: bool = True
  dropout: float = 0.0
  chunk_size: int | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture of experts as an FFN kind (CATALOG D5); num_experts=0 disables it.

  router: topk (GShard / Mixtral), switch (top-1 with capacity and token dropping), hash
  (token id modulo experts), soft (Soft MoE slots). MoE replaces the FFN in every
  `every`-th layer (layer index % every == every - 1).

  dispatch: how the routed (token, expert) assignments reach the experts, independent of the
  router (`jaxformer.layers.moe_dispatch`): 'dense' runs every expert on every token and zeroes
  the unchosen ones (the oracle; E/k times the sparse FLOPs), 'capacity' scatters tokens into
  per-expert buffers of capacity_factor * k * T / E slots per row (GShard / Switch; tokens over
  capacity are dropped, earlier positions win), 'ragged' sorts the assignments by expert and
  runs `jax.lax.ragged_dot` (dropless). 'auto' keeps each router's original one: dense for topk
  and hash, capacity for switch. Soft MoE has its own slot dispatch and takes only 'auto'.
  With a mesh 'expert' axis > 1, capacity and ragged run the experts under `shard_map` with
  all-to-all token exchange (expert parallelism).
  """
  num_experts: int = 0
  top_k: int = 2
  router: str = 'topk'
  capacity_factor: float = 1.25
  normalize_top_k: bool = True
  slots_per_expert: int = 1
  every: int = 1
  load_balance_weight: float = 0.01
  z_loss_weight: float = 0.001
  jitter: float = 0.0
  dispatch: str = 'auto'


@dataclasses.dataclass(frozen=True)
class RNNConfig:
  """The pre-Transformer baseline (CATALOG E7): GRU/LSTM encoder-decoder with attention."""
  cell: str = 'gru'
  attention: str = 'bahdanau'  # bahdanau | luong_dot | luong_general | luong_concat
  hidden_dim: int = 64
  bidirectional_encoder: bool = True


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  """Perceiver (Jaegle et al. 2021; `jaxformer.models.perceiver`): `num_latents` latent vectors
  of width d_model cross-attend to the inputs (`cross_heads` heads), then `model.num_layers`
  latent self-attention layers; the pair is applied `num_repeats` times, repeats after the first
  sharing weights when `share_weights` (the paper's recurrent form). `inputs`: 'tokens' (ids
  [B, T] with learned or sinusoidal positions) or 'pixels' (images [B, H, W, C], one input
  element per `model.patch_size`^2 patch with `fourier_bands` Fourier position features)."""
  num_latents: int = 64
  num_repeats: int = 1
  share_weights: bool = True
  cross_heads: int = 1
  inputs: str = 'tokens'
  fourier_bands: int = 16


MAMBA_SCANS = ('associative', 'sequential')
MAMBA_DT_INITS = ('random', 'constant')


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Selective state-space layers (Gu & Dao 2023; `jaxformer.layers.mamba`), used by the 'mamba'
  family preset and its hybrids.

  Each Mamba layer has an inner width I = `expand` * d_model, an SSM state of `d_state` (N) per
  inner channel, a causal depthwise convolution of width `d_conv`, and a step size dt made from a
  rank-`dt_rank` projection (None: ceil(d_model / 16), HF's 'auto'). dt's bias is initialised to
  softplus^-1 of a log-uniform sample in [dt_min, dt_max] (at least dt_floor); dt_proj's weight
  to a constant or a uniform (`dt_init`) of scale dt_scale * dt_rank^-0.5. `conv_bias` /
  `use_bias`: biases of the convolution / of the in and out projections (HF use_conv_bias /
  use_bias).

  Stack: every layer is Mamba, except that with `attention_every` = k > 0 every k-th layer
  (index % k == k - 1) is a Transformer layer (attention + FFN), a hybrid stack as in Jamba
  (Lieber et al. 2024). `ffn`: Mamba layers also carry the FFN sublayer (Jamba), or not (Mamba).
  `scan`: 'associative' (`jax.lax.associative_scan`, log-depth, for training) or 'sequential'
  (`jax.lax.scan`, the recurrence itself: the oracle, and O(N I) memory per step).
  """
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init: str = 'random'
  dt_scale: float = 1.0
  dt_floor: float = 1e-4
  conv_bias: bool = True
  use_bias: bool = False
  attention_every: int = 0
  ffn: bool = False
  scan: str = 'associative'


@dataclasses.dataclass(frozen=True)
class ElectraConfig:
  """ELECTRA (Clark et al. 2020; `jaxformer.models.electra`): a small masked-LM generator and
  the discriminator that the rest of `model` describes, sharing the token, position and type
  embeddings (and their LayerNorm) of width `model.embed_dim`. The generator is the
  discriminator's config with `generator_d_model` (None: d_model // 4, the paper's best
  generator-to-discriminator ratio is 1/4 to 1/2), `generator_num_layers` (None: num_layers),
  `generator_num_heads` (None: generator_d_model // the discriminator's head dim, at least 1,
  ELECTRA's rule with its 64-wide heads) and `generator_ffn_dim` (None: the discriminator's FFN
  width scaled by generator_d_model / d_model, ELECTRA's 4 x hidden). The objective is
  mlm + `disc_weight` * rtd (the paper's lambda = 50)."""
  generator_d_model: int | None = None
  generator_num_layers: int | None = None
  generator_num_heads: int | None = None
  generator_ffn_dim: int | None = None
  disc_weight: float = 50.0


@dataclasses.dataclass(frozen=True)
class FunnelConfig:
  """Funnel-Transformer (Dai et al. 2020; `jaxformer.models.funnel`): the encoder is
  `block_sizes` blocks of layers (their sum must equal model.num_layers), each layer of block b
  applied `block_repeats[b]` times with shared weights (None: once); every block after the first
  starts by mean-pooling the query stream with stride 2 (`pool_q_only`: keys and values of that
  first attention stay unpooled; else they are pooled too). `separate_cls` keeps the first
  ([CLS]) position out of the pooling, `truncate_seq` drops the last position before it (so the
  pooled length stays even). `model.num_decoder_layers` decoder layers (0: the base model, no
  decoder) run on the last block's output up-sampled to the input length plus the first
  block's output."""
  block_sizes: tuple[int, ...] = (4, 4, 4)
  block_repeats: tuple[int, ...] | None = None
  separate_cls: bool = True
  truncate_seq: bool = True
  pool_q_only: bool = True


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
  """The Conformer convolution module (Gulati et al. 2020; `jaxformer.models.conformer`):
  `kernel_size` of the depthwise convolution, `norm` after it ('layernorm'; 'batchnorm' is
  refused, see `conformer.check_config`), and `causal` (None: causal exactly when the family's
  attention is)."""
  kernel_size: int = 31
  norm: str = 'layernorm'
  causal: bool | None = None


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Swin Transformer (Liu et al. 2021; `jaxformer.models.swin`, checked there): stage s has
  `depths[s]` blocks of width d_model * 2^s and `num_heads[s]` heads (None: model.attention.
  num_heads * 2^s) attending within windows of `window_size`^2 patches, shifted by half a
  window in every second block; its FFN width is `mlp_ratio` times the stage width."""
  depths: tuple[int, ...] = (2, 2)
  num_heads: tuple[int, ...] | None = None
  window_size: int = 7
  mlp_ratio: float = 4.0


PEFT_SITES = ('attention', 'cross_attention', 'ffn')


@dataclasses.dataclass(frozen=True)
class PEFTConfig:
  """Parameter-efficient fine-tuning modules (CATALOG K; `jaxformer.layers.peft`), each off at 0.

  `adapter_dim` r > 0: a bottleneck adapter h + W_up act(W_down h + b_down) + b_up (Houlsby et
  al. 2019) on the output of each sublayer named in `adapter_sites` ('attention': self-attention,
  'cross_attention': the decoder's cross-attention, 'ffn': the FFN or MoE), before the residual
  add; W_up and b_up start at zero, so the model starts equal to the one without adapters.
  `prefix_length` P > 0: P learned keys and values per self-attention layer (Li & Liang 2021),
  seen by every query of every packed segment, without position information.
  `prompt_length` P > 0: P learned input embeddings in front of the tokens (Lester et al. 2021);
  the outputs at their positions are dropped (decoders, encoders) or kept for cross-attention
  (the encoder of an encoder-decoder). Which families take which: `Family.peft`.
  """
  adapter_dim: int = 0
  adapter_sites: tuple[str, ...] = ('attention', 'ffn')
  adapter_activation: str = 'relu'
  prefix_length: int = 0
  prompt_length: int = 0


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
  """Static activation quantization at the inputs of the model's matrices
  (jaxformer/layers/act_quant.py), `bits` 0: off. Set by `python -m jaxformer.compress quantize
  --activations`, which calibrates the ranges on a data split and stores them with the model; a
  model with it is evaluated and sampled, never trained.

  bits       8 (int8 codes, one scale per tensor and layer)
  symmetric  codes around 0 (absmax); False: a zero point (asymmetric min/max)
  """
  bits: int = 0
  symmetric: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One Transformer description; a family (GPT-2, LLaMA, T5, ...) is a value of this class."""
  family: str = 'decoder'
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_decoder_layers: int | None = None
  max_length: int = 2048
  attention: AttentionConfig = AttentionConfig()
  position: PositionConfig = PositionConfig()
  ffn: FFNConfig = FFNConfig()
  moe: MoEConfig = MoEConfig()
  rnn: RNNConfig = RNNConfig()
  perceiver: PerceiverConfig = PerceiverConfig()
  electra: ElectraConfig = ElectraConfig()
  funnel: FunnelConfig = FunnelConfig()
  conformer: ConformerConfig = ConformerConfig()
  swin: SwinConfig = SwinConfig()
  mamba: MambaConfig = MambaConfig()
  peft: PEFTConfig = PEFTConfig()
  act_quant: ActQuantConfig = ActQuantConfig()
  # norms and residual structure
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  norm_bias: bool = True
  norm_position: str = 'pre'
  final_norm: bool = True
  embed_norm: bool = False
  # embeddings and head
  embed_scale: bool = False
  tie_embeddings: bool = True
  logits_scale: float | None = None
  final_logit_softcap: float | None = None
  head_bias: bool = False
  type_vocab_size: int = 0
  pad_id: int = 0
  # Width E of the token / position / type embeddings (None: d_model). E != d_model adds a
  # projection E -> d_model after the embedding LayerNorm and makes the MLM head map back to E
  # for the tied output (ELECTRA's embeddings_project; families with `embed_projection`).
  embed_dim: int | None = None
  # Transformer-XL (jaxformer.models.transformer_xl): cached states of the previous segment per
  # layer, and the segment length a training row is cut into (None: the whole row).
  memory_length: int = 0
  segment_length: int | None = None
  # encoder heads (BERT / RoBERTa / ViT)
  mlm_head: bool = False
  # ELECTRA's discriminator head: one logit per token that it was replaced (act(h W + b) w + c)
  rtd_head: bool = False
  pooler: bool = False
  num_labels: int = 0
  # ViT, Swin, Perceiver on pixels
  image_size: int = 32
  patch_size: int = 4
  num_channels: int = 3
  # regularisation
  embed_dropout: float = 0.0
  residual_dropout: float = 0.0
  drop_path: float = 0.0
  # init
  init: str = 'normal'
  init_std: float = 0.02
  scaled_residual_init: bool = False
  # depth and precision; reversible: Reformer's reversible residual layers (models/reversible.py)
  reversible: bool = False
  scan_layers: bool = True
  # layer groups per iteration of the scan (`jax.lax.scan`'s unroll); >= the number of groups
  # unrolls it whole: still one traced body, but XLA sees straight-line code without the stacked
  # per-layer residual buffers (faster on CPU for shallow models; compile time grows with depth)
  scan_unroll: int = 1
  remat: str = 'none'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  # ---------------------------------------------------------------- derived values
  @property
  def num_heads(self) -> int:
    return self.attention.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.attention.num_kv_heads or self.attention.num_heads

  @property
  def head_dim(self) -> int:
    return self.attention.head_dim or self.d_model // self.attention.num_heads

  @property
  def ffn_hidden_dim(self) -> int:
    if self.ffn.hidden_dim:
      return self.ffn.hidden_dim
    if self.ffn.gated:
      return -(-int(8 * self.d_model / 3) // 8) * 8
    return 4 * self.d_model

  @property
  def mamba_inner_dim(self) -> int:
    return self.mamba.expand * self.d_model

  @property
  def mamba_dt_rank(self) -> int:
    return self.mamba.dt_rank or -(-self.d_model // 16)

  @property
  def embed_width(self) -> int:
    """The width of the input embedding tables (`embed_dim`, else d_model)."""
    return self.embed_dim if self.embed_dim is not None else self.d_model

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def is_causal(self) -> bool:
    """Whether the (decoder) self-attention is causal."""
    return self.family_spec.causal

  @property
  def family_spec(self):
    """The registered family (`models/registry.py`): what it builds and can do."""
    from jaxformer.models import registry  # pylint: disable=import-outside-toplevel
    return registry.get(self.family)

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides) -> 'ModelConfig':
    """Builds a validated config from a (nested) mapping such as `config.model.to_dict()`."""
    d = dict(_to_plain(d or {}), **overrides)
    cfg = _build(cls, d, 'model')
    cfg.validate()
    return cfg

  def replace(self, **changes) -> 'ModelConfig':
    cfg = dataclasses.replace(self, **changes)
    cfg.validate()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ---------------------------------------------------------------- validation
  def validate(self) -> None:
    # The position kinds register in modules that import flax: asked for here, not at import.
    from jaxformer.layers import position_registry
    a, p = self.attention, self.position
    fam = self.family_spec  # raises, naming the registered families, if unknown
    check_choice('model.norm', self.norm, NORMS)
    check_choice('model.norm_position', self.norm_position, NORM_POSITIONS)
    check_choice('model.ffn.activation', self.ffn.activation, ACTIVATIONS)
    check_choice('model.position.kind', p.kind, position_registry.kinds())
    check_choice('model.position.rope_scaling', p.rope_scaling, ROPE_SCALINGS)
    check_choice('model.moe.router', self.moe.router, ROUTERS)
    check_choice('model.moe.dispatch', self.moe.dispatch, DISPATCHES)
    check_choice('model.remat', self.remat, REMAT_POLICIES)
    check_choice('model.act_quant.bits', self.act_quant.bits, (0, 8))
    if self.act_quant.bits and self.reversible:
      fail('model.act_quant.bits', self.act_quant.bits,
           'must be 0 with model.reversible=True: the reversible layers run under a custom '
           'gradient that hands no per-layer state back, so activation ranges cannot be '
           'calibrated')
    if not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool) \
        or self.scan_unroll < 1:
      fail('model.scan_unroll', self.scan_unroll,
           'a positive int: layer groups per scan iteration (>= the group count unrolls all)')
    check_choice('model.init', self.init, INITS)
    check_choice('model.dtype', self.dtype, DTYPES)
    check_choice('model.param_dtype', self.param_dtype, DTYPES)
    check_choice('model.rnn.cell', self.rnn.cell, ('gru', 'lstm'))
    check_choice('model.rnn.attention', self.rnn.attention,
                 ('bahdanau', 'luong_dot', 'luong_general', 'luong_concat'))
    for name in ('vocab_size', 'd_model', 'num_layers', 'max_length'):
      if getattr(self, name) <= 0:
        fail(f'model.{name}', getattr(self, name), 'must be a positive integer')
    if a.num_heads <= 0:
      fail('model.attention.num_heads', a.num_heads, 'must be a positive integer')
    if a.head_dim is None and self.d_model % a.num_heads:
      fail('model.attention.num_heads', a.num_heads,
           f'must divide model.d_model={self.d_model} (or set model.attention.head_dim)')
    if a.num_kv_heads is not None and (a.num_kv_heads <= 0 or a.num_heads % a.num_kv_heads):
      fail('model.attention.num_kv_heads', a.num_kv_heads,
           f'must be a positive divisor of model.attention.num_heads={a.num_heads}')
    if a.window is not None and a.window <= 0:
      fail('model.attention.window', a.window, 'must be a positive integer or None')
    if not 0.0 <= a.dropout < 1.0:
      fail('model.attention.dropout', a.dropout, 'must be in [0, 1)')
    for name in ('embed_dropout', 'residual_dropout', 'drop_path'):
      if not 0.0 <= getattr(self, name) < 1.0:
        fail(f'model.{name}', getattr(self, name), 'must be in [0, 1)')
    position_registry.lookup(p.kind).validate(self)
    m = self.moe
    if m.num_experts < 0:
      fail('model.moe.num_experts', m.num_experts, 'must be >= 0 (0 disables MoE)')
    if m.num_experts:
      if m.router in ('topk',) and not 1 <= m.top_k <= m.num_experts:
        fail('model.moe.top_k', m.top_k,
             f'must be between 1 and model.moe.num_experts={m.num_experts}')
      if m.capacity_factor <= 0:
        fail('model.moe.capacity_factor', m.capacity_factor, 'must be > 0')
      if m.every <= 0:
        fail('model.moe.every', m.every, 'must be a positive integer')
      if m.router == 'soft' and m.dispatch != 'auto':
        fail('model.moe.dispatch', m.dispatch,
             "must be 'auto' for router 'soft' (Soft MoE dispatches to slots by its own "
             "softmax); 'dense', 'capacity' and 'ragged' serve the topk, switch and hash routers")
    if self.memory_length < 0:
      fail('model.memory_length', self.memory_length, 'must be >= 0 (0: no memory)')
    if self.segment_length is not None and self.segment_length <= 0:
      fail('model.segment_length', self.segment_length, 'must be a positive integer or None')
    if fam.own_layers is not None:
      # Such a family computes its own attention and runs its own layers, so a registry
      # kind or impl, the shared stack's loop strategies and remat would be silently ignored.
      why = (f'for model.family={self.family!r}, which runs its own layers instead of the '
             f'shared stack (models/stack.py): {fam.own_layers}')
      a = self.attention
      if a.kind != 'dot_product' and not fam.shared_attention:
        fail('model.attention.kind', a.kind, f"must be 'dot_product' {why}")
      if a.impl not in ('xla', 'auto') and not fam.shared_attention:
        fail('model.attention.impl', a.impl, f"must be 'xla' (or 'auto') {why}")
      if self.scan_layers:
        fail('model.scan_layers', True, f'must be False {why}')
      if self.remat != 'none':
        fail('model.remat', self.remat, f"must be 'none' {why}")
    pc = self.perceiver
    check_choice('model.perceiver.inputs', pc.inputs, ('tokens', 'pixels'))
    for name in ('num_latents', 'num_repeats', 'cross_heads', 'fourier_bands'):
      if getattr(pc, name) <= 0:
        fail(f'model.perceiver.{name}', getattr(pc, name), 'must be a positive integer')
    if self.d_model % pc.cross_heads:
      fail('model.perceiver.cross_heads', pc.cross_heads,
           f'must divide model.d_model={self.d_model}')
    self._validate_mamba()
    self._validate_peft()
    if self.ffn.chunk_size is not None and self.ffn.chunk_size <= 0:
      fail('model.ffn.chunk_size', self.ffn.chunk_size, 'must be a positive integer or None')
    if self.reversible:
      self._validate_reversible()
    fam.validate(self)
    if self.type_vocab_size < 0:
      fail('model.type_vocab_size', self.type_vocab_size, 'must be >= 0')
    if not 0 <= self.pad_id < self.vocab_size:
      fail('model.pad_id', self.pad_id, f'must be a token id in [0, {self.vocab_size})')
    if self.embed_dim is not None:
      if self.embed_dim <= 0:
        fail('model.embed_dim', self.embed_dim, 'must be a positive integer or None (d_model)')
      if self.embed_dim != self.d_model and not fam.embed_projection:
        from jaxformer.models import registry  # pylint: disable=import-outside-toplevel
        can = [n for n in registry.names() if registry.get(n).embed_projection]
        fail('model.embed_dim', self.embed_dim,
             f'model.family={self.family!r} has no projection from embeddings of another width '
             f'to model.d_model={self.d_model}: use None (or d_model), or a family that has '
             f'one: {can}')
    if self.rtd_head and (self.mlm_head or self.num_labels):
      fail('model.rtd_head', True, 'the encoder has one output head: model.rtd_head excludes '
           'model.mlm_head and model.num_labels')

  def _validate_mamba(self) -> None:
    m = self.mamba
    check_choice('model.mamba.scan', m.scan, MAMBA_SCANS)
    check_choice('model.mamba.dt_init', m.dt_init, MAMBA_DT_INITS)
    for name in ('d_state', 'd_conv', 'expand'):
      if getattr(m, name) <= 0:
        fail(f'model.mamba.{name}', getattr(m, name), 'must be a positive integer')
    if m.dt_rank is not None and m.dt_rank <= 0:
      fail('model.mamba.dt_rank', m.dt_rank, 'must be a positive integer or None (ceil(D / 16))')
    if not 0.0 < m.dt_min <= m.dt_max:
      fail('model.mamba.dt_min', m.dt_min, f'must be in (0, model.mamba.dt_max={m.dt_max}]')
    if m.dt_floor <= 0:
      fail('model.mamba.dt_floor', m.dt_floor, 'must be > 0 (softplus^-1 of the step size)')
    if m.attention_every < 0:
      fail('model.mamba.attention_every', m.attention_every,
           'must be >= 0 (0: every layer is Mamba; k: every k-th layer is attention)')

  def _validate_peft(self) -> None:
    from jaxformer.models import registry  # pylint: disable=import-outside-toplevel
    pf, fam = self.peft, self.family_spec

    def takes(piece: str, field: str, value) -> None:
      if piece not in fam.peft:
        can = [n for n in registry.names() if piece in registry.get(n).peft]
        fail(field, value, f'model.family={self.family!r} does not take it (its blocks or '
             f'embeddings are not the shared TransformerBlock / TokenEmbedder that carry the '
             f'PEFT modules): use 0, or one of the families {can}')

    for name in ('adapter_dim', 'prefix_length', 'prompt_length'):
      if not isinstance(getattr(pf, name), int) or getattr(pf, name) < 0:
        fail(f'model.peft.{name}', getattr(pf, name), 'must be an integer >= 0 (0: off)')
    if pf.adapter_dim:
      takes('adapter', 'model.peft.adapter_dim', pf.adapter_dim)
      check_choice('model.peft.adapter_activation', pf.adapter_activation, ACTIVATIONS)
      if not pf.adapter_sites or len(set(pf.adapter_sites)) != len(pf.adapter_sites):
        fail('model.peft.adapter_sites', pf.adapter_sites,
             f'must be a non-empty tuple of distinct sites from {list(PEFT_SITES)}')
      for site in pf.adapter_sites:
        check_choice('model.peft.adapter_sites', site, PEFT_SITES)
      if 'cross_attention' in pf.adapter_sites:
        takes('cross_adapter', 'model.peft.adapter_sites', pf.adapter_sites)
      if self.reversible:
        fail('model.peft.adapter_dim', pf.adapter_dim,
             'must be 0 with model.reversible=True: the reversible layers run the attention and '
             'FFN branches by hand (models/reversible.py) and would skip the adapters')
    if pf.prefix_length:
      self._validate_prefix()
    if pf.prompt_length:
      takes('prompt', 'model.peft.prompt_length', pf.prompt_length)
      if pf.prompt_length >= self.max_length:
        fail('model.peft.prompt_length', pf.prompt_length,
             f'must be < model.max_length={self.max_length}: the prompt takes positions of '
             'every row')
      if self.moe.num_experts and self.moe.router == 'hash':
        fail('model.peft.prompt_length', pf.prompt_length,
             "must be 0 with model.moe.router='hash': the hash router routes by token id, and "
             'prompt vectors have none')

  def _validate_prefix(self) -> None:
    from jaxformer.attention import registry as attention  # pylint: disable=import-outside-toplevel
    from jaxformer.layers import position_registry  # pylint: disable=import-outside-toplevel
    from jaxformer.models import registry  # pylint: disable=import-outside-toplevel
    p, fam, a = self.peft.prefix_length, self.family_spec, self.attention
    field = 'model.peft.prefix_length'
    if 'prefix' not in fam.peft:
      can = [n for n in registry.names() if 'prefix' in registry.get(n).peft]
      fail(field, p, f'model.family={self.family!r} does not take it (its layers are not the '
           f'shared Attention of a TransformerBlock stack): use 0, or one of {can}')
    impl = attention.resolve_impl(a.kind, a.impl, {'prefix'}, self.compute_dtype)
    if 'prefix' not in attention.lookup(a.kind, impl).features:
      can = [f'{k}/{i}' for k, i in attention.entries()
             if 'prefix' in attention.lookup(k, i).features]
      fail(field, p, f'model.attention.kind={a.kind!r} (impl={impl!r}) cannot attend to extra '
           'keys and values outside the sequence (its masks are built from segment ids and '
           f'positions of the sequence itself); attention that can: {can}')
    if 'shaw' in position_registry.lookup(self.position.kind).attention_features:
      fail(field, p, f'model.position.kind={self.position.kind!r} adds relative terms between '
           'key and query positions, and prefix keys have no position; use a kind without '
           "them (e.g. 'rope', 'learned', 't5', 'alibi': prefixes get no rotation and a zero "
           'bias)')

  def _validate_reversible(self) -> None:
    why = 'model.reversible=True needs '
    if not self.family_spec.single_stack:
      from jaxformer.models import registry  # pylint: disable=import-outside-toplevel
      single = [n for n in registry.names() if registry.get(n).single_stack]
      fail('model.family', self.family, why + f'a single stack: one of {single}')
    if self.norm_position == 'post':
      fail('model.norm_position', self.norm_position,
           why + "residual branches y = x + f(x): 'pre' or 'sandwich'")
    if self.moe.num_experts:
      fail('model.moe.num_experts', self.moe.num_experts, why + 'dense FFNs (0)')
    for name, value in (('attention.dropout', self.attention.dropout),
                        ('ffn.dropout', self.ffn.dropout),
                        ('residual_dropout', self.residual_dropout),
                        ('drop_path', self.drop_path)):
      if value:
        fail(f'model.{name}', value, why + '0: the backward pass recomputes every layer and '
             'would need the same dropout masks (not implemented)')


# -------------------------------------------------------------------- mapping -> dataclass
def _to_plain(d: Any) -> Any:
  if hasattr(d, 'to_dict'):
    d = d.to_dict()
  if isinstance(d, Mapping):
    return {k: _to_plain(v) for k, v in d.items()}
  return d


def _build(cls, d: Mapping[str, Any], path: str):
  if not isinstance(d, Mapping):
    fail(path, d, f'must be a mapping of {cls.__name__} fields')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f'{path}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}')
  kwargs = {}
  for name, value in d.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _build(hint, value, f'{path}.{name}')
    else:
      kwargs[name] = _coerce(f'{path}.{name}', value, hint)
  return cls(**kwargs)


def _coerce(field: str, value: Any, hint) -> Any:
  """Checks a scalar against its annotation; ints are accepted where floats are expected."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(field, value, arg)
      except ConfigError:
        pass
    fail(field, value, f'expected {hint}')
  if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if hint is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if hint is bool and isinstance(value, bool):
    return value
  if hint is str and isinstance(value, str):
    return value
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    if not isinstance(value, (list, tuple)):
      fail(field, value, f'expected a sequence of {args[0].__name__}')
    return tuple(_coerce(f'{field}[{i}]', v, args[0]) for i, v in enumerate(value))
  if origin is Mapping or hint is Mapping:
    if isinstance(value, Mapping):
      return FrozenDict(dict(value))
    fail(field, value, 'expected a mapping')
  if hint in (int, float, bool, str):
    fail(field, value, f'expected a {hint.__name__}')
  return value
