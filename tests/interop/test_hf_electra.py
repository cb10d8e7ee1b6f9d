"""Hugging Face parity of ELECTRA (CATALOG E2): tiny random `ElectraForPreTraining`
(discriminator) and `ElectraForMaskedLM` (generator) models, built locally and perturbed so no
norm or bias is trivial, convert with `from_hf` into the encoder the `electra` family runs as
its two halves, and give the same fp32 logits within 1e-4 on the real (unpadded) tokens, with
embedding_size != hidden_size (a projection) and == (none). `electra_from_hf` imports a
generator and a discriminator with shared embeddings as one `electra`-family model whose two
halves reproduce both."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from jaxformer.config import ConfigError
from jaxformer.interop.hf import electra_from_hf, from_hf

ATOL = 1e-4


def hf_model(model_cls, seed=0, **kw):
  torch.manual_seed(seed)
  model = model_cls(T.ElectraConfig(attn_implementation='eager', **kw))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def inputs(vocab, t=10, seed=1):
  rng = np.random.default_rng(seed)
  tokens = torch.from_numpy(rng.integers(0, vocab, (2, t)))
  types = torch.from_numpy(rng.integers(0, 2, (2, t)))
  mask = torch.ones_like(tokens)
  mask[1, 6:] = 0
  return tokens, types, mask


def run_both(hf, cfg, model):
  tokens, types, mask = inputs(hf.config.vocab_size)
  with torch.no_grad():
    ref = hf(tokens, attention_mask=mask, token_type_ids=types).logits.numpy()
  ours = np.asarray(model(jnp.asarray(tokens.numpy()), segment_ids=jnp.asarray(mask.numpy()),
                          token_types=jnp.asarray(types.numpy())).logits)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  real = mask.numpy().astype(bool)
  return float(np.max(np.abs(ours[real] - ref[real])))


# (embedding_size, hidden_size, heads, layers, intermediate, hidden_act)
SIZES = {'projected_E16_D32': (16, 32, 4, 2, 48, 'gelu'),
         'unprojected_E24_relu': (24, 24, 3, 1, 40, 'relu')}


@pytest.mark.parametrize('name', sorted(SIZES))
def test_discriminator_parity(name):
  e, d, n, layers, f, act = SIZES[name]
  hf = hf_model(T.ElectraForPreTraining, vocab_size=83, embedding_size=e, hidden_size=d,
                num_attention_heads=n, num_hidden_layers=layers, intermediate_size=f,
                hidden_act=act, max_position_embeddings=16)
  cfg, model = from_hf(hf)
  assert cfg.family == 'encoder' and cfg.rtd_head and not cfg.mlm_head
  assert (cfg.embed_width, cfg.d_model) == (e, d)
  assert (model.embed_proj is not None) == (e != d)
  assert run_both(hf, cfg, model) <= ATOL


@pytest.mark.parametrize('name', ['projected_E16_D32'])
def test_generator_parity(name):
  e, d, n, layers, f, act = SIZES[name]
  # A generator narrower than its embeddings, as ELECTRA's are (hidden 1/4 of E here too).
  hf = hf_model(T.ElectraForMaskedLM, vocab_size=83, embedding_size=d, hidden_size=e,
                num_attention_heads=2, num_hidden_layers=layers, intermediate_size=f,
                hidden_act=act, max_position_embeddings=16)
  cfg, model = from_hf(hf)
  assert cfg.mlm_head and not cfg.rtd_head and cfg.tie_embeddings
  assert (cfg.embed_width, cfg.d_model) == (d, e)
  assert run_both(hf, cfg, model) <= ATOL


def test_generator_with_another_activation_is_refused():
  hf = hf_model(T.ElectraForMaskedLM, vocab_size=40, embedding_size=8, hidden_size=16,
                num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                hidden_act='relu', max_position_embeddings=8)
  with pytest.raises(ConfigError, match="hf.hidden_act='relu'.*generator_predictions"):
    from_hf(hf)


def electra_pair(share=True):
  common = dict(vocab_size=83, embedding_size=24, max_position_embeddings=16)
  disc = hf_model(T.ElectraForPreTraining, seed=0, hidden_size=32, num_attention_heads=4,
                  num_hidden_layers=2, intermediate_size=48, **common)
  gen = hf_model(T.ElectraForMaskedLM, seed=1, hidden_size=16, num_attention_heads=2,
                 num_hidden_layers=1, intermediate_size=24, **common)
  if share:
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    gen.tie_weights()
  return gen, disc


def test_generator_and_discriminator_import_as_one_electra_model():
  gen, disc = electra_pair()
  cfg, model = electra_from_hf(gen, disc)
  assert cfg.family == 'electra' and cfg.embed_width == 24 and cfg.d_model == 32
  assert (cfg.electra.generator_d_model, cfg.electra.generator_num_layers) == (16, 1)
  assert model.generator.embedder is model.discriminator.embedder
  assert run_both(disc, cfg, model) <= ATOL
  assert run_both(gen, cfg, model.generator) <= ATOL


def test_a_pair_with_different_embeddings_is_refused():
  gen, disc = electra_pair(share=False)
  with pytest.raises(ConfigError, match='hf.generator.*word_embeddings.*shares one embedder'):
    electra_from_hf(gen, disc)
