"""Model-level properties for every family: build, jit == eager, scan == unrolled,
remat == no remat (outputs and gradients), cached decoding == full forward, causality, padding
invariance, token-id and config validation (CATALOG D2, E1-E7, F5, A6)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models import build_model, family

TINY = dict(vocab_size=61, d_model=32, num_layers=2, max_length=64,
            attention=dict(num_heads=4))


def tiny(name, **kw):
  over = dict(TINY)
  for k, v in kw.items():
    if isinstance(v, dict) and isinstance(over.get(k), dict):
      over[k] = {**over[k], **v}
    else:
      over[k] = v
  return family(name, **over)


DECODERS = {
    'gpt2': tiny('gpt2'),
    'llama_gqa': tiny('llama', attention=dict(num_heads=4, num_kv_heads=2)),
    'mistral_window': tiny('mistral', attention=dict(num_heads=4, num_kv_heads=1, window=5)),
    'mixtral': tiny('mixtral', moe=dict(num_experts=4, top_k=2)),
    'alibi_sandwich': tiny('llama', position=dict(kind='alibi'), norm_position='sandwich'),
    'nope_post': tiny('gpt2', position=dict(kind='none'), norm_position='post'),
    't5_bias_decoder': tiny('llama', position=dict(kind='t5')),
    'sinusoidal_shaw': tiny('gpt2', position=dict(kind='shaw')),
}


def forward(model, tokens, **kw):
  return model(tokens, **kw).logits


def tokens_for(cfg, b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_jit_scan_remat_equal(name):
  cfg = DECODERS[name]
  toks = tokens_for(cfg)
  model = build_model(cfg, seed=1)
  ref = forward(model, toks)
  chex.assert_shape(ref, (2, 12, cfg.vocab_size))
  chex.assert_tree_all_finite(ref)
  jitted = nnx.jit(forward)(model, toks)
  chex.assert_trees_all_close(jitted, ref, atol=1e-5)
  # scan == unrolled and remat == no remat share the same stacked parameters.
  for over in (dict(scan_layers=False), dict(remat='full'), dict(remat='dots'),
               dict(remat='save_attention_out', scan_layers=False), dict(scan_unroll=2),
               dict(scan_unroll=64)):
    other = build_model(cfg.replace(**over), seed=1)
    chex.assert_trees_all_close(forward(other, toks), ref, atol=1e-5)


@pytest.mark.parametrize('name', ['llama_gqa', 'mixtral'])
def test_gradients_equal_under_remat_and_unrolled(name):
  cfg = DECODERS[name]
  toks = tokens_for(cfg)

  def grads(c):
    model = build_model(c, seed=3)
    def loss(m):
      return jnp.mean(forward(m, toks) ** 2)
    return nnx.grad(loss)(model)

  ref = nnx.to_pure_dict(grads(cfg))
  for over in (dict(remat='full'), dict(scan_layers=False, remat='dots'), dict(scan_unroll=64)):
    chex.assert_trees_all_close(nnx.to_pure_dict(grads(cfg.replace(**over))), ref, atol=1e-5)


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_causal_and_cached_decoding(name):
  cfg = DECODERS[name]
  model = build_model(cfg, seed=2)
  toks = tokens_for(cfg, t=10)
  full = forward(model, toks)
  # Causality: changing tokens after t leaves logits up to t unchanged.
  toks2 = toks.at[:, 6:].set((toks[:, 6:] + 7) % cfg.vocab_size)
  chex.assert_trees_all_close(forward(model, toks2)[:, :6], full[:, :6], atol=1e-5)
  # Cached decoding: a 4-token prompt chunk then one token at a time.
  cache = model.init_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(10)[None], (2, 10))
  out = model(toks[:, :4], positions=pos[:, :4], cache=cache)
  steps = [out.logits]
  cache = out.cache
  for t in range(4, 10):
    out = model(toks[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
    steps.append(out.logits)
    cache = out.cache
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padded_batched_prompts_decode_like_unpadded():
  cfg = DECODERS['llama_gqa']
  model = build_model(cfg, seed=4)
  toks = tokens_for(cfg, b=1, t=6)
  ref = forward(model, toks)
  # The same prompt left-padded by 3 inside a cache: padding has segment id 0.
  padded = jnp.concatenate([jnp.zeros((1, 3), toks.dtype), toks], axis=1)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
  pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
  out = model(padded, segment_ids=seg, positions=pos, cache=model.init_cache(1, 12))
  chex.assert_trees_all_close(out.logits[:, 3:], ref, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  cfg = DECODERS['gpt2']
  model = build_model(cfg, seed=5)
  a, b = tokens_for(cfg, b=1, t=5, seed=1), tokens_for(cfg, b=1, t=7, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  out = forward(model, packed, segment_ids=seg)
  chex.assert_trees_all_close(out[:, :5], forward(model, a), atol=1e-5)
  chex.assert_trees_all_close(out[:, 5:], forward(model, b), atol=1e-5)


@pytest.mark.parametrize('name', ['bert', 'roberta'])
def test_encoder_padding_invariance(name):
  cfg = tiny(name, pooler=True, num_labels=3)
  model = build_model(cfg, seed=6)
  toks = tokens_for(cfg, t=9)
  seg = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
  out = model(toks, segment_ids=seg)
  toks2 = toks.at[1, 6:].set(5)
  out2 = model(toks2, segment_ids=seg)
  chex.assert_shape(out.logits, (2, 9, cfg.vocab_size))
  chex.assert_shape(out.pooled, (2, cfg.d_model))
  chex.assert_trees_all_close(out2.logits[1, :6], out.logits[1, :6], atol=1e-5)
  chex.assert_trees_all_close(out2.logits[0], out.logits[0], atol=1e-5)


@pytest.mark.parametrize('name', ['t5', 't5_v1_1', 'bart', 'transformer'])
def test_encoder_decoder_cached_decoding_and_padding(name):
  cfg = tiny(name)
  model = build_model(cfg, seed=7)
  src = tokens_for(cfg, t=8, seed=1)
  tgt = tokens_for(cfg, t=6, seed=2)
  src_seg = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  full = model(src, tgt, encoder_segment_ids=src_seg).logits
  chex.assert_shape(full, (2, 6, cfg.vocab_size))
  # Encoder padding invariance.
  src2 = src.at[1, 5:].set(3)
  chex.assert_trees_all_close(model(src2, tgt, encoder_segment_ids=src_seg).logits, full,
                              atol=1e-5)
  # Decoder causality.
  tgt2 = tgt.at[:, 4:].set(1)
  chex.assert_trees_all_close(model(src, tgt2, encoder_segment_ids=src_seg).logits[:, :4],
                              full[:, :4], atol=1e-5)
  # Cached decoding with cross-attention K/V computed once.
  enc, enc_seg, _ = model.encode(src, segment_ids=src_seg)
  cache = model.init_cache(2, 8, enc, enc_seg)
  steps = []
  for t in range(6):
    out = model.decode(tgt[:, t:t + 1], enc, enc_segment_ids=enc_seg,
                       positions=jnp.full((2, 1), t), cache=cache)
    cache = out.cache
    steps.append(out.logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, atol=1e-5)
  # scan == unrolled.
  other = build_model(cfg.replace(scan_layers=False, remat='full'), seed=7)
  chex.assert_trees_all_close(other(src, tgt, encoder_segment_ids=src_seg).logits, full,
                              atol=1e-5)


def test_vit_shapes_and_jit():
  cfg = tiny('vit', image_size=16, patch_size=4, num_labels=5)
  model = build_model(cfg, seed=8)
  img = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  out = model(img)
  chex.assert_shape(out.logits, (2, 5))
  chex.assert_shape(out.hidden, (2, 17, cfg.d_model))
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x).logits)(model, img), out.logits,
                              atol=1e-5)
  with pytest.raises(ValueError, match='image_size'):
    model(jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize('attn', ['bahdanau', 'luong_dot', 'luong_general', 'luong_concat'])
@pytest.mark.parametrize('cell', ['gru', 'lstm'])
def test_rnn_seq2seq_causal_and_padding(attn, cell):
  cfg = tiny('rnn', rnn=dict(cell=cell, attention=attn, hidden_dim=16))
  model = build_model(cfg, seed=9)
  src, tgt = tokens_for(cfg, t=7, seed=1), tokens_for(cfg, t=5, seed=2)
  seg = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  out = model(src, tgt, encoder_segment_ids=seg).logits
  chex.assert_shape(out, (2, 5, cfg.vocab_size))
  chex.assert_trees_all_close(
      model(src.at[1, 4:].set(2), tgt, encoder_segment_ids=seg).logits, out, atol=1e-5)
  chex.assert_trees_all_close(
      model(src, tgt.at[:, 3:].set(1), encoder_segment_ids=seg).logits[:, :3], out[:, :3],
      atol=1e-5)


def test_moe_aux_losses_reported():
  cfg = DECODERS['mixtral']
  out = build_model(cfg, seed=10)(tokens_for(cfg))
  assert set(out.aux) == {'load_balance_loss', 'router_z_loss'}
  assert float(out.aux['load_balance_loss']) > 0.0
  # Every layer contributes: the sum over 2 layers is at least 2 * the minimum of 1.0.
  assert float(out.aux['load_balance_loss']) >= 2.0 - 1e-5


def test_moe_every_other_layer_groups():
  cfg = tiny('mixtral', num_layers=4, moe=dict(num_experts=4, every=2))
  model = build_model(cfg, seed=11)
  assert model.stack.num_groups == 2
  out = model(tokens_for(cfg))
  chex.assert_tree_all_finite(out.logits)
  with pytest.raises(ConfigError, match='moe.every'):
    build_model(tiny('mixtral', num_layers=3, moe=dict(num_experts=4, every=2)))


def test_bf16_compute_end_to_end():
  cfg = DECODERS['llama_gqa'].replace(dtype='bfloat16')
  model = build_model(cfg, seed=12)
  out = model(tokens_for(cfg))
  assert out.logits.dtype == jnp.float32
  assert out.hidden.dtype == jnp.bfloat16
  ref = build_model(DECODERS['llama_gqa'], seed=12)(tokens_for(cfg)).logits
  # bf16 keeps 8 bits of mantissa: logits agree to bf16 accuracy, not fp32.
  assert float(jnp.max(jnp.abs(out.logits - ref))) < 0.1
  grads = nnx.grad(lambda m: jnp.mean(m(tokens_for(cfg)).logits))(model)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(nnx.to_pure_dict(grads)))


@pytest.mark.parametrize('bad, field', [
    (dict(d_model=30), 'model.attention.num_heads'),
    (dict(attention=dict(num_heads=4, num_kv_heads=3)), 'model.attention.num_kv_heads'),
    (dict(attention=dict(num_heads=4, kind='nope')), 'model.attention.kind'),
    (dict(position=dict(kind='learned', max_length=16)), 'model.position.max_length'),
    (dict(position=dict(kind='rope', rotary_fraction=0.625)), 'model.position.rotary_fraction'),
    (dict(moe=dict(num_experts=2, top_k=3)), 'model.moe.top_k'),
    (dict(norm='batchnorm'), 'model.norm'),
    (dict(ffn=dict(activation='swish2')), 'model.ffn.activation'),
])
def test_bad_configs_fail_at_build_naming_field(bad, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    build_model(tiny('llama', **bad))


def test_out_of_vocab_tokens_raise():
  cfg = DECODERS['gpt2']
  model = build_model(cfg)
  with pytest.raises(ValueError, match='vocabulary'):
    model(jnp.array([[1, 2, cfg.vocab_size]]))
  with pytest.raises(ValueError, match='vocabulary'):
    model(jnp.array([[-1, 2, 3]]))
  with pytest.raises(ValueError, match='max_length'):
    model(jnp.zeros((1, cfg.max_length + 1), jnp.int32))


def test_every_parameter_has_logical_axis_names():
  for cfg in [DECODERS['mixtral'], tiny('t5'), tiny('bert'),
              tiny('vit', image_size=8, patch_size=4), tiny('rnn'), tiny('transformer_xl'),
              tiny('gpt2', norm='scalenorm')]:
    model = build_model(cfg)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = v.get_metadata().get('out_sharding')
      assert names is not None and len(names) == v[...].ndim, (path, names, v[...].shape)
      assert all(n is None or isinstance(n, str) for n in names)


def test_layer_loops_are_strategies_chosen_by_config():
  from jaxformer.models import stack as stack_lib
  cfg = DECODERS['llama_gqa']
  assert set(stack_lib.LAYER_LOOPS) >= {'scan', 'unrolled', 'reversible'}
  assert stack_lib.layer_loop(cfg).name == 'scan'
  assert stack_lib.layer_loop(cfg.replace(scan_layers=False)).name == 'unrolled'
  assert stack_lib.layer_loop(cfg.replace(reversible=True)).name == 'reversible'


@pytest.mark.parametrize('name', ['transformer_xl', 'rnn'])
def test_families_without_the_shared_stack_refuse_its_loop_options(name):
  family(name)  # the presets turn scanning off
  with pytest.raises(ConfigError, match='model.scan_layers.*runs its own layers'):
    family(name, scan_layers=True)
  with pytest.raises(ConfigError, match="model.remat.*must be 'none'"):
    family(name, remat='full')


@pytest.mark.parametrize('value', [0, -1, True, 1.5])
def test_scan_unroll_must_be_a_positive_int(value):
  with pytest.raises(ConfigError, match='model.scan_unroll'):
    family('llama', scan_unroll=value)
