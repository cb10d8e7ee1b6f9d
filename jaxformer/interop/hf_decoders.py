"""Hugging Face decoder-only families <-> jaxformer DecoderLM (CATALOG E3, E4).

GPT-2 (GPT2LMHeadModel): Conv1D weights are stored [in, out], so they need no transpose; the
fused c_attn [D, 3D] splits into q, k, v; gelu_new is our gelu_tanh.
LLaMA / Mistral / Mixtral (*ForCausalLM): separate q/k/v/o projections (GQA via
num_key_value_heads), rotate_half RoPE with `rope_parameters['rope_theta']`, SwiGLU
(gate_proj, up_proj, down_proj), Mistral's sliding window; Mixtral's router `mlp.gate.weight`
[E, D] and, in transformers v5, packed experts `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows
first) and `mlp.experts.down_proj` [E, D, F]. Checkpoints in the v4 layout
(`block_sparse_moe.experts.{e}.w1/w2/w3.weight`) are packed on import.

Training-only differences: HF Mixtral's router jitter multiplies the hidden states seen by the
router and the experts, jaxformer's (`moe.jitter`) the router input only; the router loss weights
keep jaxformer's defaults (HF sums its load-balancing loss over top-k, see jaxformer.layers.moe).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jaxformer.config import ModelConfig, fail
from jaxformer.interop import hf_rules as R
from jaxformer.models.stack import layer_period


# --------------------------------------------------------------------------- GPT-2
def gpt2_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  R.require(c, 'add_cross_attention', (False,), 'GPT-2 with cross-attention')
  R.require(c, 'scale_attn_by_inverse_layer_idx', (False,), 'per-layer attention scaling')
  d = c.n_embd
  return 'gpt2', dict(
      vocab_size=c.vocab_size, d_model=d, num_layers=c.n_layer, max_length=c.n_positions,
      norm_eps=c.layer_norm_epsilon,
      attention=dict(num_heads=c.n_head, scale=None if c.scale_attn_weights else 1.0,
                     dropout=float(c.attn_pdrop)),
      position=dict(kind='learned', max_length=c.n_positions, offset=0),
      ffn=dict(activation=R.activation(c, 'activation_function'), hidden_dim=c.n_inner or 4 * d),
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd, 'transformer.wte.weight',
                               'lm_head.weight'),
      embed_dropout=float(c.embd_pdrop), residual_dropout=float(c.resid_pdrop))


def gpt2_rules(cfg: ModelConfig) -> list[R.Rule]:
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  rules = [R.same('embedder.embed.embedding', 'transformer.wte.weight'),
           R.same('embedder.positions.table', 'transformer.wpe.weight'),
           *R.norm('final_norm', 'transformer.ln_f', True),
           *R.tied_head(cfg, 'embedder.embed.embedding', 'lm_head.weight')]
  for l in range(cfg.num_layers):
    blk, p = 'stack.layers.blocks.0', f'transformer.h.{l}'
    rules += [
        *R.norm(f'{blk}.attn_sub.norm', f'{p}.ln_1', True, l),
        R.Rule(tuple(f'{blk}.self_attn.w{x}' for x in 'qkv'), (f'{p}.attn.c_attn.weight',),
               lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
               lambda *ws: (np.concatenate([x.reshape(d, n * h) for x in ws], axis=1),), l),
        R.Rule(tuple(f'{blk}.self_attn.b{x}' for x in 'qkv'), (f'{p}.attn.c_attn.bias',),
               lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
               lambda *bs: (np.concatenate([x.reshape(n * h) for x in bs]),), l),
        R.Rule((f'{blk}.self_attn.wo',), (f'{p}.attn.c_proj.weight',),
               lambda w: (w.reshape(n, h, d),), lambda w: (w.reshape(n * h, d),), l),
        R.same(f'{blk}.self_attn.bo', f'{p}.attn.c_proj.bias', l),
        *R.norm(f'{blk}.ffn_sub.norm', f'{p}.ln_2', True, l),
        R.same(f'{blk}.ffn.wi', f'{p}.mlp.c_fc.weight', l),
        R.same(f'{blk}.ffn.bi', f'{p}.mlp.c_fc.bias', l),
        R.same(f'{blk}.ffn.wo', f'{p}.mlp.c_proj.weight', l),
        R.same(f'{blk}.ffn.bo', f'{p}.mlp.c_proj.bias', l),
    ]
  return rules


# Causal-mask buffers of old GPT-2 checkpoints.
GPT2_IGNORE = (r'\.attn\.(masked_)?bias$',)


def gpt2_hf_config(cfg: ModelConfig):
  import transformers

  t = 'GPT-2'
  a = cfg.attention
  R.need(cfg, 'norm', cfg.norm, 'layernorm', t)
  R.need(cfg, 'norm_bias', cfg.norm_bias, True, t)
  R.need(cfg, 'position.offset', cfg.position.offset, 0, t)
  R.need(cfg, 'attention.qkv_bias', a.qkv_bias, True, t)
  R.need(cfg, 'attention.out_bias', a.out_bias, True, t)
  R.need(cfg, 'attention.num_kv_heads', cfg.num_kv_heads, cfg.num_heads, t)
  R.need(cfg, 'attention.head_dim', cfg.head_dim, cfg.d_model // cfg.num_heads, t)
  R.need(cfg, 'attention.scale', a.scale, (None, 1.0), t)
  R.need(cfg, 'ffn.bias', cfg.ffn.bias, True, t)
  R.need(cfg, 'ffn.gated', cfg.ffn.gated, False, t)
  _common_checks(cfg, t)
  return transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, n_inner=cfg.ffn_hidden_dim, n_positions=cfg.position.max_length,
      activation_function='gelu_new' if cfg.ffn.activation == 'gelu_tanh' else (
          R.HF_ACTIVATIONS[cfg.ffn.activation]),
      layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=a.scale is None,
      tie_word_embeddings=cfg.tie_embeddings, attn_pdrop=a.dropout,
      embd_pdrop=cfg.embed_dropout, resid_pdrop=cfg.residual_dropout,
      bos_token_id=None, eos_token_id=None, architectures=['GPT2LMHeadModel'])


# --------------------------------------------------------------------------- LLaMA family
def _rope(c) -> dict:
  params = getattr(c, 'rope_parameters', None) or {}
  theta = params.get('rope_theta', getattr(c, 'rope_theta', None) or 10000.0)
  kind = params.get('rope_type', 'default')
  frac = params.get('partial_rotary_factor', getattr(c, 'partial_rotary_factor', None))
  if frac not in (None, 1.0):
    fail('hf.rope_parameters.partial_rotary_factor', frac, 'only full rotary embeddings are '
         'supported')
  if kind == 'default':
    return dict(rope_theta=float(theta), rope_scaling='none', rope_scaling_factor=1.0)
  if kind == 'linear':
    return dict(rope_theta=float(theta), rope_scaling='linear',
                rope_scaling_factor=float(params['factor']))
  fail('hf.rope_parameters.rope_type', kind, "supported RoPE types are ['default', 'linear']")


def llama_config(c, sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
  name = c.model_type
  R.require(c, 'pretraining_tp', (1, None), 'tensor-parallel slicing of the projections')
  bias = bool(getattr(c, 'attention_bias', False))
  head_dim = getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads
  over = dict(
      vocab_size=c.vocab_size, d_model=c.hidden_size, num_layers=c.num_hidden_layers,
      max_length=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
      attention=dict(num_heads=c.num_attention_heads,
                     num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                     head_dim=head_dim if head_dim != c.hidden_size // c.num_attention_heads
                     else None,
                     qkv_bias=bias, out_bias=bias, dropout=float(c.attention_dropout or 0.0),
                     window=getattr(c, 'sliding_window', None)),
      position=dict(kind='rope', **_rope(c)),
      ffn=dict(activation=R.activation(c, 'hidden_act'), gated=True,
               hidden_dim=c.intermediate_size, bias=bool(getattr(c, 'mlp_bias', False))),
      tie_embeddings=R.is_tied(c.tie_word_embeddings, sd, 'model.embed_tokens.weight',
                               'lm_head.weight'))
  if name == 'mixtral':
    over['moe'] = dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                       router='topk', normalize_top_k=True, every=1,
                       jitter=float(c.router_jitter_noise))
  return name, over


def llama_rules(cfg: ModelConfig) -> list[R.Rule]:
  p = layer_period(cfg)
  rules = [R.same('embedder.embed.embedding', 'model.embed_tokens.weight'),
           *R.norm('final_norm', 'model.norm', False),
           *R.tied_head(cfg, 'embedder.embed.embedding', 'lm_head.weight')]
  names = dict(q='q_proj', k='k_proj', v='v_proj', o='o_proj')
  for l in range(cfg.num_layers):
    g, b = divmod(l, p)
    blk, hf = f'stack.layers.blocks.{b}', f'model.layers.{l}'
    rules += [*R.norm(f'{blk}.attn_sub.norm', f'{hf}.input_layernorm', False, g),
              *R.norm(f'{blk}.ffn_sub.norm', f'{hf}.post_attention_layernorm', False, g),
              *R.attention(f'{blk}.self_attn', f'{hf}.self_attn', cfg, names, g)]
    if cfg.moe.num_experts and b == p - 1:
      f = cfg.ffn_hidden_dim
      rules += [
          R.linear(f'{blk}.ffn.router', f'{hf}.mlp.gate.weight', g),
          R.Rule((f'{blk}.ffn.wi_gate', f'{blk}.ffn.wi_up'), (f'{hf}.mlp.experts.gate_up_proj',),
                 lambda w: (w[:, :f].transpose(0, 2, 1), w[:, f:].transpose(0, 2, 1)),
                 lambda wg, wu: (np.concatenate([wg, wu], axis=2).transpose(0, 2, 1),), g),
          R.Rule((f'{blk}.ffn.wo',), (f'{hf}.mlp.experts.down_proj',),
                 lambda w: (w.transpose(0, 2, 1),), lambda w: (w.transpose(0, 2, 1),), g)]
    else:
      rules += R.dense_ffn(f'{blk}.ffn', f'{hf}.mlp', cfg,
                           dict(wi_gate='gate_proj', wi_up='up_proj', wo='down_proj'), g)
  return rules


LLAMA_IGNORE = (r'rotary_emb\.inv_freq$',)

_EXPERT = re.compile(r'^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$')


def mixtral_normalize(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packs v4-layout Mixtral experts (w1 gate, w3 up, w2 down per expert) into the v5 layout."""
  out, experts = {}, {}
  for k, v in sd.items():
    m = _EXPERT.match(k)
    if m:
      experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
    else:
      out[k.replace('.block_sparse_moe.', '.mlp.')] = v
  for layer, ws in experts.items():
    e = 1 + max(i for i, _ in ws)
    try:
      out[f'{layer}.mlp.experts.gate_up_proj'] = np.stack(
          [np.concatenate([ws[(i, 'w1')], ws[(i, 'w3')]], axis=0) for i in range(e)])
      out[f'{layer}.mlp.experts.down_proj'] = np.stack([ws[(i, 'w2')] for i in range(e)])
    except KeyError as err:
      raise ValueError(f'{layer}.block_sparse_moe.experts: missing expert weight {err}') from None
  return out


def llama_hf_config(cfg: ModelConfig):
  import transformers

  a, pc, m = cfg.attention, cfg.position, cfg.moe
  target = 'Mixtral' if m.num_experts else ('Mistral' if a.window else 'LLaMA')
  R.need(cfg, 'norm', cfg.norm, 'rmsnorm', target)
  R.need(cfg, 'ffn.gated', cfg.ffn.gated, True, target)
  R.need(cfg, 'attention.out_bias', a.out_bias, a.qkv_bias, target + ' (attention_bias)')
  R.need(cfg, 'attention.scale', a.scale, None, target)
  R.need(cfg, 'position.rotary_fraction', pc.rotary_fraction, 1.0, target)
  R.need(cfg, 'position.rope_scaling', pc.rope_scaling, ('none', 'linear'), target)
  _common_checks(cfg, target)
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_hidden_dim, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, hidden_act=R.HF_ACTIVATIONS[cfg.ffn.activation],
            max_position_embeddings=cfg.max_length, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=a.dropout,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
  rope = {'rope_type': 'default', 'rope_theta': pc.rope_theta}
  if pc.rope_scaling == 'linear':
    rope = {'rope_type': 'linear', 'rope_theta': pc.rope_theta, 'factor': pc.rope_scaling_factor}
  kw['rope_parameters'] = rope
  if m.num_experts:
    R.need(cfg, 'moe.router', m.router, 'topk', target)
    R.need(cfg, 'moe.normalize_top_k', m.normalize_top_k, True, target)
    R.need(cfg, 'moe.every', m.every, 1, target)
    R.need(cfg, 'ffn.bias', cfg.ffn.bias, False, target)
    R.need(cfg, 'attention.qkv_bias', a.qkv_bias, False, target)
    return transformers.MixtralConfig(
        **kw, sliding_window=a.window, num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k, router_jitter_noise=m.jitter,
        architectures=['MixtralForCausalLM'])
  if a.window:
    R.need(cfg, 'ffn.bias', cfg.ffn.bias, False, target)
    R.need(cfg, 'attention.qkv_bias', a.qkv_bias, False, target)
    return transformers.MistralConfig(**kw, sliding_window=a.window,
                                      architectures=['MistralForCausalLM'])
  return transformers.LlamaConfig(**kw, attention_bias=a.qkv_bias, mlp_bias=cfg.ffn.bias,
                                  architectures=['LlamaForCausalLM'])


def _common_checks(cfg: ModelConfig, target: str) -> None:
  a = cfg.attention
  R.need(cfg, 'family', cfg.family, 'decoder', target)
  R.need(cfg, 'norm_position', cfg.norm_position, 'pre', target)
  R.need(cfg, 'final_norm', cfg.final_norm, True, target)
  R.need(cfg, 'embed_norm', cfg.embed_norm, False, target)
  R.need(cfg, 'embed_scale', cfg.embed_scale, False, target)
  R.need(cfg, 'logits_scale', cfg.logits_scale, None, target)
  R.need(cfg, 'final_logit_softcap', cfg.final_logit_softcap, None, target)
  R.need(cfg, 'head_bias', cfg.head_bias, False, target)
  R.need(cfg, 'type_vocab_size', cfg.type_vocab_size, 0, target)
  R.need(cfg, 'attention.kind', a.kind, 'dot_product', target)
  R.need(cfg, 'attention.qk_norm', a.qk_norm, False, target)
  R.need(cfg, 'attention.logit_softcap', a.logit_softcap, None, target)
  if cfg.position.kind == 'learned':
    R.need(cfg, 'moe.num_experts', cfg.moe.num_experts, 0, target)
    R.need(cfg, 'attention.window', a.window, None, target)
