"""`jaxformer.interop.hf` beyond in-memory parity: safetensors files and checkpoint directories
(both directions, HF `from_pretrained` included), v4 checkpoint layouts, bfloat16 tensors,
dropout streams of converted models, and the errors for what jaxformer cannot express."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import save_file

from jaxformer.config import ConfigError
from jaxformer.interop.hf import (from_hf, read_safetensors, save_hf_safetensors,
                                  to_hf_state_dict)
from jaxformer.models import build_model, family

ATOL = 1e-4


def hf_model(model_cls, config_cls, seed=0, **kw):
  torch.manual_seed(seed)
  model = model_cls(config_cls(attn_implementation='eager', **kw))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def numpy_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


TOKENS = torch.from_numpy(np.random.default_rng(0).integers(0, 60, (2, 9)))
LLAMA = dict(vocab_size=60, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)


# =========================================================================== files
def test_safetensors_file_and_checkpoint_dir_import(tmp_path):
  hf = hf_model(T.LlamaForCausalLM, T.LlamaConfig, tie_word_embeddings=True, **LLAMA)
  _, ref_model = from_hf(hf)
  file = str(tmp_path / 'weights.safetensors')
  save_file(numpy_sd(hf), file)
  _, model = from_hf(hf.config, file)
  jax.tree.map(np.testing.assert_array_equal, params(model), params(ref_model))
  # save_pretrained stores the tied head once; the directory holds config.json too.
  hf.save_pretrained(tmp_path / 'ckpt')
  cfg, model = from_hf(str(tmp_path / 'ckpt'))
  assert cfg.tie_embeddings
  with torch.no_grad():
    ref = hf(TOKENS).logits
  assert max_err(model(jnp.asarray(TOKENS.numpy())).logits, ref) <= ATOL


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_save_hf_safetensors_loads_with_from_pretrained(tmp_path, name):
  if name == 'gpt2':
    cfg = family('gpt2', vocab_size=60, d_model=24, num_layers=2, attention=dict(num_heads=3),
                 max_length=16, position=dict(max_length=16))
  else:
    cfg = family('llama', vocab_size=60, d_model=32, num_layers=2,
                 attention=dict(num_heads=4, num_kv_heads=1), ffn=dict(hidden_dim=40),
                 position=dict(rope_theta=300.0), norm_eps=1e-5)
  model = build_model(cfg, seed=4)
  file = save_hf_safetensors(model, cfg, tmp_path / 'out')
  np.testing.assert_equal(read_safetensors(file), to_hf_state_dict(model, cfg))
  hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', attn_implementation='eager')
  with torch.no_grad():
    ref = hf.eval()(TOKENS).logits
  ours = model(jnp.asarray(TOKENS.numpy())).logits
  assert max_err(ours, ref) <= ATOL
  cfg2, model2 = from_hf(str(tmp_path / 'out'))
  assert (cfg2.head_dim, cfg2.num_kv_heads, cfg2.ffn_hidden_dim, cfg2.position, cfg2.norm_eps) == (
      cfg.head_dim, cfg.num_kv_heads, cfg.ffn_hidden_dim, cfg.position, cfg.norm_eps)
  jax.tree.map(np.testing.assert_array_equal, params(model2), params(model))
  # A bare .safetensors path writes only the tensors.
  file = save_hf_safetensors(model, cfg, tmp_path / 'bare.safetensors')
  assert file.endswith('bare.safetensors') and not (tmp_path / 'config.json').exists()


def test_bfloat16_checkpoint(tmp_path):
  hf = hf_model(T.LlamaForCausalLM, T.LlamaConfig, **LLAMA).to(torch.bfloat16)
  file = str(tmp_path / 'bf16.safetensors')
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  save_file({k: v.astype(jnp.bfloat16) for k, v in sd.items()}, file)
  _, model = from_hf(hf.config, file)
  _, ref = from_hf(hf.config, sd)  # exact float32 upcasts of the bfloat16 values
  jax.tree.map(np.testing.assert_array_equal, params(model), params(ref))
  cfg16, model16 = from_hf(hf.config, file, param_dtype='bfloat16')
  assert cfg16.param_dtype == 'bfloat16'
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)),
               params(model16), params(ref))


# =========================================================================== v4 layouts
def test_mixtral_v4_expert_layout():
  hf = hf_model(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=3,
                num_experts_per_tok=2, **LLAMA)
  sd = numpy_sd(hf)
  _, ref = from_hf(hf.config, sd)
  old, f = {}, hf.config.intermediate_size
  for k, v in sd.items():
    k = k.replace('.mlp.', '.block_sparse_moe.')
    if k.endswith('experts.gate_up_proj'):
      for e in range(v.shape[0]):
        old[k.replace('gate_up_proj', f'{e}.w1.weight')] = v[e, :f]
        old[k.replace('gate_up_proj', f'{e}.w3.weight')] = v[e, f:]
    elif k.endswith('experts.down_proj'):
      for e in range(v.shape[0]):
        old[k.replace('down_proj', f'{e}.w2.weight')] = v[e]
    else:
      old[k] = v
  _, model = from_hf(hf.config, old)
  jax.tree.map(np.testing.assert_array_equal, params(model), params(ref))


def test_vit_v4_layout_and_base_model_keys():
  hf = hf_model(T.ViTModel, T.ViTConfig, hidden_size=16, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=24, image_size=8, patch_size=4)
  sd = numpy_sd(hf)
  _, ref = from_hf(hf.config, sd)
  renames = (('layers.', 'encoder.layer.'), ('attention.q_proj', 'attention.attention.query'),
             ('attention.k_proj', 'attention.attention.key'),
             ('attention.v_proj', 'attention.attention.value'),
             ('attention.o_proj', 'attention.output.dense'), ('mlp.fc1', 'intermediate.dense'),
             ('mlp.fc2', 'output.dense'))
  old = {}
  for k, v in sd.items():
    for a, b in renames:
      k = k.replace(a, b)
    old[k] = v
  assert 'encoder.layer.1.attention.attention.query.weight' in old
  _, model = from_hf(hf.config, old)
  jax.tree.map(np.testing.assert_array_equal, params(model), params(ref))


# =========================================================================== dropout streams
def test_converted_model_trains_with_dropout():
  hf = hf_model(T.GPT2LMHeadModel, T.GPT2Config, vocab_size=60, n_embd=16, n_layer=1, n_head=2,
                n_positions=16, attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1,
                bos_token_id=None, eos_token_id=None)
  cfg, model = from_hf(hf)
  assert (cfg.attention.dropout, cfg.residual_dropout, cfg.embed_dropout) == (0.2, 0.1, 0.1)
  x = jnp.asarray(TOKENS.numpy())
  train = nnx.jit(lambda m, x: m(x, deterministic=False).logits)
  a, b = train(model, x), train(model, x)
  chex.assert_tree_all_finite((a, b))
  assert max_err(a, b) > 0  # the dropout streams advance: two draws differ


# =========================================================================== errors
def _config_error(config, sd, match):
  with pytest.raises(ConfigError, match=match):
    from_hf(config, sd)


def test_unsupported_hf_settings_name_the_field():
  _config_error(T.GPT2Config(n_embd=16, n_head=2, n_layer=1, scale_attn_by_inverse_layer_idx=True),
                {}, r'hf\.scale_attn_by_inverse_layer_idx=True')
  _config_error(T.LlamaConfig(hidden_size=16, num_attention_heads=2, rope_parameters=dict(
      rope_type='dynamic', rope_theta=1e4, factor=2.0)), {}, r'hf\.rope_parameters\.rope_type')
  _config_error(T.BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=48),
                {}, r'hf\.decoder_ffn_dim=48')
  _config_error(T.RobertaConfig(hidden_size=16, num_attention_heads=2, hidden_act='relu'),
                {'lm_head.bias': np.zeros(3)}, r'hf\.hidden_act')
  _config_error(T.T5Config(d_model=16, feed_forward_proj='gated-quick_gelu'), {},
                r'hf\.feed_forward_proj')
  _config_error(T.GPTNeoXConfig(), {}, r"hf\.model_type='gpt_neox'")
  bart = T.BartConfig(d_model=16, tie_word_embeddings=False)
  emb = np.zeros((4, 16), np.float32)
  _config_error(bart, {'model.shared.weight': emb, 'model.encoder.embed_tokens.weight': emb + 1},
                r'hf\.tie_word_embeddings=False')


def test_unknown_and_missing_tensors_are_listed():
  hf = hf_model(T.BertForPreTraining, T.BertConfig, vocab_size=40, hidden_size=16,
                num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=12)
  sd = numpy_sd(hf)
  with pytest.raises(ValueError, match='cls.seq_relationship.weight'):
    from_hf(hf.config, sd)  # the next-sentence head has no jaxformer counterpart
  sd = {k: v for k, v in sd.items() if not k.startswith('cls.seq_relationship')}
  del sd['bert.encoder.layer.0.output.dense.bias']
  with pytest.raises(ValueError, match=r'missing: \[.bert\.encoder\.layer\.0\.output\.dense'):
    from_hf(hf.config, sd)


def test_export_rejects_what_hf_cannot_express():
  tiny = dict(vocab_size=32, d_model=16, num_layers=1, attention=dict(num_heads=2))
  for cfg, match in [
      (family('llama', **tiny, position=dict(kind='alibi')), r'model\.position\.kind'),
      (family('llama', **{**tiny, 'attention': dict(num_heads=2, qk_norm=True)}),
       r'model\.attention\.qk_norm'),
      (family('gpt2', **tiny, norm_position='post'), r'model\.norm_position'),
      (family('bert', **tiny), r'model\.family'),
  ]:
    with pytest.raises(ConfigError, match=match):
      to_hf_state_dict(None, cfg)
