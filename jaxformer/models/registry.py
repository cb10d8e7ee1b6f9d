"""Model families by name: `model.family` -> the module that builds it and what it can do.

A family is one file under `models/` plus one `register(Family(...))` line below. Everything
the rest of the code asks about a family is a field here, so no caller branches on its name:

  * `model`: 'module:Class', imported when the family is built (`build_model`). The class
    takes `(cfg: ModelConfig, *, rngs)`.
  * `tasks`: the objectives of `train/tasks.py` it can be trained on (the first is its own).
  * `causal`: whether its (decoder) self-attention is causal (`ModelConfig.is_causal`).
  * `generation`: how `jaxformer.inference` starts decoding it: 'decoder' (a prompt fills a
    KV cache), 'seq2seq' (an encoder pass, then the decoder from a start token), 'rnn' (the
    same with an RNN state), or None (it does not generate).
  * `own_layers`: None if its layers are the shared stack (`models/stack.py`: scanned, remat,
    pipelined, any attention kind); else the reason it runs its own, which refuses
    `scan_layers`, `remat`, attention kinds and pipeline parallelism at config time.
  * `block`: 'module:Class' of the layer its shared stack is made of: `TransformerBlock`
    (models/block.py) unless the family brings its own (the Conformer block). The class takes
    `(cfg, *, causal, cross, moe, rngs)`, is called like `TransformerBlock` and makes its own
    decoding cache (`init_cache`).
  * `shared_attention`: with `own_layers`, its layers still build the shared `Attention`
    (jaxformer.attention), so `model.attention.kind` / `impl` are not refused wholesale: its
    `check` says which it takes.
  * `single_stack`: one stack of self-attention blocks (reversible layers need that).
  * `mixer`: the token mixer of its shared-stack layers: 'attention', or 'mamba' (selective
    state-space layers, with attention in every `mamba.attention_every`-th layer:
    `models/block.py` `layer_mixer`).
  * `context_parallel`: its attention runs over a sequence that context parallelism can split.
  * `packing`: None if packed examples (segment ids) are kept apart; else why packing is
    refused.
  * `token_inputs`: its input is a token sequence bounded by `model.max_length`.
  * `depth_fields`: the ModelConfig fields that set the depth of each pipelined stack.
  * `transformer_flops`: the 6N + attention FLOPs-per-token estimate applies (MFU metrics).
  * `embed_projection`: it accepts `model.embed_dim` != d_model (embedding tables of width E
    projected to d_model, and an MLM head mapping back to E).
  * `pipeline`: None if pipeline parallelism can cut its stacks into stages (and `own_layers`
    is None); else why it cannot, refused at config time.
  * `input_embedder`: the attribute path ('a.b') of the `TokenEmbedder` that embeds the
    model's first input (its source tokens), whose `input_delta` hook jaxformer.analysis
    perturbs; None for a family without token embeddings.
  * `peft`: the parameter-efficient modules of `model.peft` (jaxformer/layers/peft.py) it
    takes: 'adapter' (bottleneck adapters in its TransformerBlocks), 'cross_adapter' (also after
    their cross-attention), 'prefix' (learned keys/values in their self-attention), 'prompt'
    (learned input embeddings before its TokenEmbedder's tokens); others are refused.
  * `check`: optional 'module:function' run by `ModelConfig.validate` for the family's own
    fields (it raises ConfigError naming the field).

This module imports nothing heavy, so `jaxformer.config` can ask it for the family names.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model: str
  tasks: tuple[str, ...]
  causal: bool = False
  generation: str | None = None
  own_layers: str | None = None
  block: str = 'jaxformer.models.block:TransformerBlock'
  shared_attention: bool = False
  single_stack: bool = False
  mixer: str = 'attention'
  context_parallel: bool = False
  packing: str | None = None
  token_inputs: bool = True
  depth_fields: tuple[str, ...] = ('num_layers',)
  transformer_flops: bool = True
  embed_projection: bool = False
  pipeline: str | None = None
  input_embedder: str | None = 'embedder'
  check: str | None = None
  peft: tuple[str, ...] = ()

  def build(self, cfg, *, rngs):
    return _resolve(self.model)(cfg, rngs=rngs)

  def block_class(self) -> type:
    return _resolve(self.block)

  def validate(self, cfg) -> None:
    if self.check is not None:
      _resolve(self.check)(cfg)


_REGISTRY: dict[str, Family] = {}
GENERATION = ('decoder', 'seq2seq', 'rnn')


def register(family: Family) -> Family:
  if family.name in _REGISTRY and _REGISTRY[family.name] != family:
    raise ValueError(f'model family {family.name!r} registered twice')
  if family.generation not in GENERATION + (None,):
    raise ValueError(f'{family.name}: generation must be one of {GENERATION} or None')
  _REGISTRY[family.name] = family
  return family


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Family:
  if name not in _REGISTRY:
    from jaxformer.config import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f'model.family={name!r} is invalid: allowed values are {sorted(_REGISTRY)}')
  return _REGISTRY[name]


def _resolve(path: str) -> Any:
  module, _, attr = path.partition(':')
  return getattr(importlib.import_module(module), attr)


SEQ2SEQ_TASKS = ('seq2seq', 'span_corruption', 'denoise')

PEFT = ('adapter', 'prefix', 'prompt')
register(Family('decoder', 'jaxformer.models.decoder:DecoderLM', ('lm',), causal=True,
                generation='decoder', single_stack=True, context_parallel=True, peft=PEFT))
register(Family('encoder', 'jaxformer.models.encoder:EncoderModel', ('mlm', 'classification'),
                single_stack=True, context_parallel=True, embed_projection=True, peft=PEFT))
register(Family('encoder_decoder', 'jaxformer.models.encoder_decoder:EncoderDecoder',
                SEQ2SEQ_TASKS, causal=True, generation='seq2seq', input_embedder='enc_embedder',
                depth_fields=('num_layers', 'num_decoder_layers'),
                peft=PEFT + ('cross_adapter',)))
register(Family('vit', 'jaxformer.models.vit:ViT', ('classification',), single_stack=True,
                token_inputs=False, input_embedder=None, check='jaxformer.models.vit:check_config'))
register(Family(
    'rnn_seq2seq', 'jaxformer.models.rnn_seq2seq:RNNSeq2Seq', SEQ2SEQ_TASKS, causal=True,
    generation='rnn', transformer_flops=False, input_embedder=None,
    own_layers='it has recurrent layers and computes its own attention (Bahdanau / Luong)',
    packing='it carries its state along a whole row, so packed examples would leak into each '
            'other'))
register(Family(
    'transformer_xl', 'jaxformer.models.transformer_xl:TransformerXL', ('lm',), causal=True,
    own_layers='its segment-level recurrence carries memory from layer to layer across '
               'segments, and it computes its own attention (relative terms (a)-(d))',
    check='jaxformer.models.transformer_xl:check_config'))
register(Family('perceiver', 'jaxformer.models.perceiver:Perceiver', ('classification',)))
register(Family(
    'electra', 'jaxformer.models.electra:Electra', ('rtd',), embed_projection=True,
    input_embedder='discriminator.embedder',
    transformer_flops=False, check='jaxformer.models.electra:check_config',
    pipeline='its generator and discriminator are two stacks of different depths with token '
             'sampling between them, which one pipeline schedule does not run'))
register(Family(
    'funnel', 'jaxformer.models.funnel:Funnel', ('mlm', 'classification'),
    own_layers='it pools the sequence between blocks of layers and computes its own attention '
               '(relative position and token-type terms)',
    packing='mean pooling averages neighbouring positions, so packed examples would mix',
    transformer_flops=False, check='jaxformer.models.funnel:check_config'))
CONFORMER = dict(block='jaxformer.models.conformer:ConformerBlock', single_stack=True,
                 check='jaxformer.models.conformer:check_config')
register(Family('conformer', 'jaxformer.models.encoder:EncoderModel', ('classification', 'mlm'),
                **CONFORMER))
register(Family('conformer_lm', 'jaxformer.models.decoder:DecoderLM', ('lm',), causal=True,
                generation='decoder', **CONFORMER))
register(Family(
    'swin', 'jaxformer.models.swin:Swin', ('classification',), token_inputs=False,
    input_embedder=None,
    transformer_flops=False, shared_attention=True, check='jaxformer.models.swin:check_config',
    own_layers='its stages change width and resolution (patch merging) and alternate plain and '
               'shifted windows, so its blocks are not one scanned stack'))
# Gu & Dao 2023: the decoder LM with selective state-space layers (and attention layers in a
# hybrid); the attention FLOPs estimate does not apply.
register(Family('mamba', 'jaxformer.models.decoder:DecoderLM', ('lm',), causal=True,
                generation='decoder', mixer='mamba', transformer_flops=False,
                check='jaxformer.models.block:check_mamba_config'))
