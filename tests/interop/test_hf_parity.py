"""Hugging Face parity of `jaxformer.interop.hf` (CATALOG E2-E6): tiny randomly initialised
transformers models (built locally, no download), converted with `from_hf`, give the same fp32
outputs within 1e-4 max abs; decoders exported with `to_hf_state_dict` load strictly into a fresh
HF model that reproduces the logits. Every HF parameter is perturbed after init so that norm
scales and biases are not the trivial ones/zeros."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from jaxformer.interop.hf import from_hf, to_hf_config, to_hf_state_dict

ATOL = 1e-4
B = 2


def hf_model(model_cls, config_cls, seed=0, **kw):
  torch.manual_seed(seed)
  model = model_cls(config_cls(attn_implementation='eager', **kw))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def assert_close(ours, ref, where=None):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  if where is not None:
    ours, ref = ours[where], ref[where]
  err = float(np.max(np.abs(ours - ref)))
  assert err <= ATOL, f'max abs error {err:.3g} > {ATOL}'


def ids(vocab, t, seed, low=0):
  return torch.from_numpy(np.random.default_rng(seed).integers(low, vocab, (B, t)))


def j(x):
  return jnp.asarray(x.numpy())


# =========================================================================== decoders
DECODERS = {
    # GPT-2: odd head count, tied head; scanned layers.
    'gpt2_tied_3heads': (T.GPT2LMHeadModel, T.GPT2Config, dict(
        vocab_size=97, n_embd=24, n_layer=2, n_head=3, n_positions=16,
        bos_token_id=None, eos_token_id=None), {}),
    # GPT-2: untied, exact GELU, custom inner size, unscaled scores, another eps.
    'gpt2_untied_gelu_unscaled': (T.GPT2LMHeadModel, T.GPT2Config, dict(
        vocab_size=101, n_embd=32, n_layer=1, n_head=4, n_positions=16, n_inner=40,
        activation_function='gelu', layer_norm_epsilon=1e-3, scale_attn_weights=False,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        dict(scan_layers=False)),
    # LLaMA GQA 4/2, rope theta 500, untied; scanned layers.
    'llama_gqa': (T.LlamaForCausalLM, T.LlamaConfig, dict(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type='default', rope_theta=500.0),
        bos_token_id=None, eos_token_id=None), {}),
    # LLaMA MQA with 3 heads, biases, tied, linear RoPE scaling.
    'llama_mqa_bias_tied_linear_rope': (T.LlamaForCausalLM, T.LlamaConfig, dict(
        vocab_size=90, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='linear', rope_theta=10000.0, factor=2.0),
        bos_token_id=None, eos_token_id=None), dict(scan_layers=False)),
    # LLaMA with head_dim != hidden / heads (6 heads of 12 over d = 48), kv 3.
    'llama_head_dim_12': (T.LlamaForCausalLM, T.LlamaConfig, dict(
        vocab_size=64, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=3, head_dim=12,
        bos_token_id=None, eos_token_id=None), dict(scan_layers=False)),
    # Mistral: 5 heads, MQA, sliding window 4 < sequence length 12.
    'mistral_window4_5heads': (T.MistralForCausalLM, T.MistralConfig, dict(
        vocab_size=80, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, sliding_window=4, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type='default', rope_theta=1e6),
        bos_token_id=None, eos_token_id=None), dict(scan_layers=False)),
    # Mixtral: 4 experts, top-2, GQA; scanned layers.
    'mixtral_4x2': (T.MixtralForCausalLM, T.MixtralConfig, dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, bos_token_id=None, eos_token_id=None), {}),
    # Mixtral: top-1 of 3 experts, tied, MQA.
    'mixtral_3x1_tied': (T.MixtralForCausalLM, T.MixtralConfig, dict(
        vocab_size=70, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
        num_experts_per_tok=1, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None), dict(scan_layers=False)),
}


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_parity_and_export(name):
  model_cls, config_cls, kw, over = DECODERS[name]
  hf = hf_model(model_cls, config_cls, **kw)
  cfg, model = from_hf(hf, **over)
  assert cfg.num_kv_heads == getattr(hf.config, 'num_key_value_heads', cfg.num_heads)
  tokens = ids(hf.config.vocab_size, 12, seed=1)
  # Row 0 unpadded, row 1 right-padded: HF masks padded keys; compare the real tokens only.
  mask = torch.ones_like(tokens)
  mask[1, 9:] = 0
  real = mask.numpy().astype(bool)
  with torch.no_grad():
    ref = hf(tokens, attention_mask=mask).logits
  ours = model(j(tokens), segment_ids=j(mask)).logits
  assert_close(ours, ref, real)

  # Export: the same keys and tensors as the HF state dict, loadable strictly into a fresh model.
  sd = to_hf_state_dict(model, cfg)
  ref_sd = hf.state_dict()
  assert set(sd) == set(ref_sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(v, ref_sd[k].numpy(), err_msg=k)
  fresh = model_cls(to_hf_config(cfg)).eval()
  fresh.config._attn_implementation = 'eager'
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    assert_close(ours, fresh(tokens, attention_mask=mask).logits, real)


# =========================================================================== encoders
def test_bert_mlm_parity_with_padding_and_token_types():
  hf = hf_model(T.BertForMaskedLM, T.BertConfig, vocab_size=99, hidden_size=24,
                num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                max_position_embeddings=16, layer_norm_eps=1e-12)
  cfg, model = from_hf(hf)
  assert cfg.mlm_head and cfg.tie_embeddings and not cfg.pooler
  tokens = ids(99, 10, seed=2)
  types = ids(2, 10, seed=3)
  right = torch.ones_like(tokens)
  right[0, 7:] = 0
  left = torch.ones_like(tokens)
  left[1, :4] = 0
  with torch.no_grad():
    ref_right = hf(tokens, attention_mask=right, token_type_ids=types).logits
    ref_left = hf(tokens, attention_mask=left, token_type_ids=types).logits
  out = model(j(tokens), segment_ids=j(right), token_types=j(types)).logits
  assert_close(out, ref_right, right.numpy().astype(bool))
  # BERT counts positions over the padded row, so left padding needs explicit positions.
  arange = jnp.broadcast_to(jnp.arange(10), (B, 10))
  out = model(j(tokens), segment_ids=j(left), token_types=j(types), positions=arange).logits
  assert_close(out, ref_left, left.numpy().astype(bool))


def test_bert_base_model_hidden_states_and_pooler():
  hf = hf_model(T.BertModel, T.BertConfig, vocab_size=50, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=48, max_position_embeddings=12,
                hidden_act='gelu_new', layer_norm_eps=1e-6, type_vocab_size=3)
  cfg, model = from_hf(hf, scan_layers=False)
  assert cfg.pooler and not cfg.mlm_head and cfg.ffn.activation == 'gelu_tanh'
  tokens = ids(50, 12, seed=4)
  types = ids(3, 12, seed=5)
  with torch.no_grad():
    ref = hf(tokens, token_type_ids=types)
  out = model(j(tokens), token_types=j(types))
  assert_close(out.logits, ref.last_hidden_state)
  assert_close(out.pooled, ref.pooler_output)


def test_roberta_mlm_parity_left_and_right_padding():
  hf = hf_model(T.RobertaForMaskedLM, T.RobertaConfig, vocab_size=90, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=18, type_vocab_size=1, layer_norm_eps=1e-5,
                pad_token_id=1)
  cfg, model = from_hf(hf)
  assert (cfg.position.offset, cfg.position.max_length, cfg.pad_id) == (2, 16, 1)
  tokens = ids(90, 12, seed=6, low=3)
  mask = torch.ones_like(tokens)
  mask[0, 8:] = 0   # right padding
  mask[1, :3] = 0   # left padding: RoBERTa's position ids skip the pads, like our restart
  tokens = torch.where(mask.bool(), tokens, torch.ones_like(tokens))
  with torch.no_grad():
    ref = hf(tokens, attention_mask=mask).logits
  assert_close(model(j(tokens), segment_ids=j(mask)).logits, ref, mask.numpy().astype(bool))


def test_vit_classification_parity():
  hf = hf_model(T.ViTForImageClassification, T.ViTConfig, hidden_size=24, num_hidden_layers=2,
                num_attention_heads=3, intermediate_size=32, image_size=8, patch_size=4,
                num_labels=5, layer_norm_eps=1e-6, qkv_bias=False)
  cfg, model = from_hf(hf)
  assert cfg.num_labels == 5 and not cfg.pooler and not cfg.attention.qkv_bias
  images = torch.randn(B, 3, 8, 8)
  with torch.no_grad():
    ref = hf(images).logits
  assert_close(model(j(images.permute(0, 2, 3, 1))).logits, ref)


def test_vit_model_hidden_states_and_pooler():
  hf = hf_model(T.ViTModel, T.ViTConfig, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=24, image_size=8, patch_size=2,
                num_channels=1)
  cfg, model = from_hf(hf, scan_layers=False)
  images = torch.randn(B, 1, 8, 8)
  with torch.no_grad():
    ref = hf(images)
  out = model(j(images.permute(0, 2, 3, 1)))
  assert_close(out.logits, ref.last_hidden_state)
  assert_close(out.pooled, ref.pooler_output)


# =========================================================================== encoder-decoders
def _seq2seq_inputs(vocab, src_len, tgt_len, seed, pad=0):
  src, tgt = ids(vocab, src_len, seed, low=3), ids(vocab, tgt_len, seed + 1, low=3)
  src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
  src_mask[0, src_len - 3:] = 0   # right padding
  src_mask[1, :2] = 0             # left padding (relative / no positions in the encoder)
  tgt_mask[1, tgt_len - 2:] = 0
  src = torch.where(src_mask.bool(), src, torch.full_like(src, pad))
  tgt = torch.where(tgt_mask.bool(), tgt, torch.full_like(tgt, pad))
  return src, tgt, src_mask, tgt_mask


@pytest.mark.parametrize('version', ['v1_0', 'v1_1'])
def test_t5_parity_with_padding(version):
  if version == 'v1_0':  # ReLU, tied head scaled by d**-0.5, H * N != D, 2 encoder / 1 decoder
    kw = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
              num_heads=3, feed_forward_proj='relu')
    over = {}
  else:  # gated GELU, unscaled head, few buckets so the log-spaced ones are hit at T = 16
    kw = dict(vocab_size=64, d_model=24, d_kv=16, d_ff=40, num_layers=1, num_heads=2,
              feed_forward_proj='gated-gelu', tie_word_embeddings=False, layer_norm_epsilon=1e-5,
              relative_attention_num_buckets=8, relative_attention_max_distance=12)
    over = dict(scan_layers=False)
  hf = hf_model(T.T5ForConditionalGeneration, T.T5Config, **kw)
  if version == 'v1_1':
    # transformers 5 always ties lm_head to shared in the module; from_pretrained unties them for
    # original v1.1 checkpoints, whose lm_head differs. Build that model.
    torch.manual_seed(1)
    hf.lm_head = torch.nn.Linear(kw['d_model'], kw['vocab_size'], bias=False)
  cfg, model = from_hf(hf, **over)
  assert cfg.head_dim == kw['d_kv'] and cfg.ffn.gated == (version == 'v1_1')
  assert (cfg.logits_scale is None) == (not cfg.tie_embeddings) == (version == 'v1_1')
  src, tgt, src_mask, tgt_mask = _seq2seq_inputs(64, 16, 9, seed=7)
  with torch.no_grad():
    ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
             decoder_attention_mask=tgt_mask).logits
  out = model(j(src), j(tgt), encoder_segment_ids=j(src_mask), decoder_segment_ids=j(tgt_mask))
  assert_close(out.logits, ref, tgt_mask.numpy().astype(bool))


@pytest.mark.parametrize('tied', [True, False])
def test_bart_parity_with_padding(tied):
  hf = hf_model(T.BartForConditionalGeneration, T.BartConfig, vocab_size=72, d_model=32,
                encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
                max_position_embeddings=16, scale_embedding=tied, tie_word_embeddings=tied,
                activation_function='gelu' if tied else 'relu', pad_token_id=1)
  with torch.no_grad():
    hf.final_logits_bias.normal_()
    # transformers 5 unties encoder, decoder and shared embeddings along with the head; a
    # checkpoint that stores one table for both sides (what jaxformer can express) has them equal.
    for emb in (hf.model.encoder.embed_tokens, hf.model.decoder.embed_tokens):
      emb.weight.copy_(hf.model.shared.weight)
  cfg, model = from_hf(hf, **({} if tied else dict(scan_layers=False)))
  assert cfg.tie_embeddings == tied and cfg.embed_scale == tied
  # BART counts encoder positions over the padded row: pad on the right only.
  src, tgt, src_mask, tgt_mask = _seq2seq_inputs(72, 12, 8, seed=8, pad=1)
  src_mask[1] = 1
  with torch.no_grad():
    ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
             decoder_attention_mask=tgt_mask).logits
  out = model(j(src), j(tgt), encoder_segment_ids=j(src_mask), decoder_segment_ids=j(tgt_mask))
  assert_close(out.logits, ref, tgt_mask.numpy().astype(bool))


# =========================================================================== sharded import
def test_import_onto_a_mesh_places_every_tensor_in_its_shards():
  """`from_hf(..., layout=)` sends each converted tensor from the host into its shards
  (dp2 x fsdp2 x tp2 here) and the model keeps HF's logits."""
  from jaxformer.parallel.config import ParallelConfig
  from jaxformer.parallel.mesh import make_mesh
  from jaxformer.parallel.sharding import Layout
  model_cls, config_cls, kw, over = DECODERS['llama_gqa']
  hf = hf_model(model_cls, config_cls, **kw)
  parallel = ParallelConfig(mesh={'data': 2, 'fsdp': 2, 'tensor': 2})
  layout = Layout(make_mesh(parallel), parallel.logical_rules())
  cfg, model = from_hf(hf, layout=layout, **over)
  wq = model.stack.layers.blocks[0].self_attn.wq.get_value()  # [L, D, N, H]
  assert wq.shape == (2, 32, 4, 8)
  assert {s.data.shape for s in wq.addressable_shards} == {(2, 16, 2, 8)}
  tokens = ids(hf.config.vocab_size, 12, seed=1)
  with torch.no_grad():
    ref = hf(tokens).logits
  from flax import nnx
  assert_close(nnx.jit(lambda m, t: m(t).logits)(model, j(tokens)), ref)
