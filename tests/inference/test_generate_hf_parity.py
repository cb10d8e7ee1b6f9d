"""Greedy decoding of models converted from small random Hugging Face models produces the same
32 tokens as HF `generate` (issue 3 acceptance; CATALOG G and E3/E4/E5)."""

import numpy as np
import pytest
import torch
import transformers

from jaxformer.inference import generate, generate_seq2seq
from jaxformer.interop import hf

NEW = 32


def sharpen(model, std=0.5, seed=0):
  """Random weights with a large spread, so logits are far from ties and greedy paths diverge
  on any real difference instead of agreeing by degenerate repetition alone."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[-1] ** 0.5 * 4)
  return model.eval()


def hf_greedy(model, prompt_ids, **kw):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, num_beams=1, eos_token_id=None, **kw)
  return out[0].tolist()


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_decoder_greedy_equals_hf_generate(kind):
  torch.manual_seed(0)
  if kind == 'gpt2':
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=None, eos_token_id=None,
                                     pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
  config._attn_implementation = 'eager'
  model = sharpen(model)
  cfg, ours = hf.from_hf(model)
  prompts = [[5, 17, 42, 8, 3], [11, 60]]
  out = generate(ours, prompts, max_new_tokens=NEW)
  tokens = np.asarray(out.tokens)
  for row, prompt in enumerate(prompts):
    want = hf_greedy(model, prompt, pad_token_id=0)[len(prompt):]
    assert len(set(want)) > 3, 'degenerate reference: sharpen the weights'
    assert tokens[row].tolist() == want, (row, tokens[row].tolist(), want)


def test_t5_greedy_equals_hf_generate():
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=None, feed_forward_proj='gated-gelu',
                                 tie_word_embeddings=False)
  config._attn_implementation = 'eager'
  model = sharpen(transformers.T5ForConditionalGeneration(config), std=1.0)
  cfg, ours = hf.from_hf(model)
  src = [9, 33, 57, 21, 4, 70]
  with torch.no_grad():
    want = model.generate(torch.tensor([src]), max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, num_beams=1, eos_token_id=None)[0].tolist()[1:]
  out = generate_seq2seq(ours, [src], start_id=0, max_new_tokens=NEW)
  assert len(set(want)) > 3
  assert np.asarray(out.tokens)[0].tolist() == want
