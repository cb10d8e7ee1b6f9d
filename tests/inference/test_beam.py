"""Beam search (CATALOG G): one beam is greedy decoding; with enough beams the search returns
exactly the best sequences found by enumerating every sequence of a vocabulary-5 model; the
hypotheses and scores (sum log p / length ** length_penalty) equal those of transformers' beam
search on a converted T5."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.inference import beam_search, beam_search_seq2seq, generate, generate_seq2seq
from jaxformer.models import build_model, family

# The same configs and prompts as test_decode.py, so greedy runs share compiled programs.
TINY = dict(vocab_size=61, d_model=32, num_layers=2, max_length=64)
LLAMA = family('llama', **TINY, init_std=0.5,
               attention=dict(num_heads=4, num_kv_heads=2, window=3))
T5 = family('t5', **TINY, init_std=1.0, attention=dict(num_heads=4))
PROMPTS = [[5, 9, 13], [7], [11, 3, 8, 20, 4, 6, 2]]
N = 8


@functools.cache
def model(cfg, seed=0):
  return build_model(cfg, seed=seed)


def log_softmax(x):
  return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32)), np.float64)


def test_one_beam_is_greedy_for_a_decoder():
  m = model(LLAMA)
  greedy = generate(m, PROMPTS, max_new_tokens=N)
  beam = beam_search(m, PROMPTS, num_beams=1, max_new_tokens=N, length_penalty=0.5)
  chex.assert_shape(beam.tokens, (3, 1, N))
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beam.lengths[:, 0], [N] * 3)
  np.testing.assert_allclose(beam.scores[:, 0], np.asarray(greedy.logprobs).sum(1) / N ** 0.5,
                             atol=1e-5)


def test_one_beam_is_greedy_with_eos_for_t5():
  m = model(T5)
  free = generate_seq2seq(m, PROMPTS, start_id=0, max_new_tokens=N)
  toks, lps = np.asarray(free.tokens), np.asarray(free.logprobs)
  eos = int(toks[0, 3])
  beam = beam_search_seq2seq(m, PROMPTS, start_id=0, num_beams=1, max_new_tokens=N,
                             stop_tokens=[eos], early_stopping=True, pad_id=-1)
  # Greedy with a stop token: the free greedy output cut after its first eos.
  for r in range(3):
    hits = np.flatnonzero(toks[r] == eos)
    n = hits[0] + 1 if hits.size else N
    assert r or n <= 4
    np.testing.assert_array_equal(beam.tokens[r, 0, :n], toks[r, :n])
    assert (np.asarray(beam.tokens[r, 0, n:]) == -1).all() and int(beam.lengths[r, 0]) == n
    np.testing.assert_allclose(beam.scores[r, 0], lps[r, :n].sum() / n, atol=1e-5)


def brute_force(m, prompt, eos, length, lp):
  """{sequence: score} over every sequence that ends with eos or reaches `length` tokens."""
  v = m.cfg.vocab_size
  conts = np.array(list(itertools.product(range(v), repeat=length)), np.int32)
  x = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
  logits = np.asarray(nnx.jit(lambda m, x: m(x).logits)(m, jnp.asarray(x)))[:, len(prompt) - 1:-1]
  lp_tok = np.take_along_axis(log_softmax(logits), conts[..., None], -1)[..., 0]
  cum = np.cumsum(lp_tok, 1)
  scores = {}
  for c, s in zip(conts, cum):
    for n in range(1, length + 1):
      if n == length or c[n - 1] == eos:
        scores[tuple(c[:n].tolist())] = s[n - 1] / n ** lp
        break
  return scores


def test_enough_beams_find_the_brute_force_best():
  length_penalty = 1.0
  cfg = family('llama', vocab_size=5, d_model=16, num_layers=1, max_length=16, init_std=0.5,
               attention=dict(num_heads=2))
  m = model(cfg, seed=3)
  prompts, eos, length, k = [[1, 2], [3]], 4, 3, 25
  out = beam_search(m, prompts, num_beams=k, max_new_tokens=length, stop_tokens=[eos],
                    length_penalty=length_penalty, early_stopping='never', pad_id=-1)
  early = 0
  for b, p in enumerate(prompts):
    scores = brute_force(m, np.array(p), eos, length, length_penalty)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    assert ranked[0][1] - ranked[1][1] > 1e-4
    best, _ = ranked[0]
    n = int(out.lengths[b, 0])
    assert tuple(np.asarray(out.tokens[b, 0, :n]).tolist()) == best
    assert (np.asarray(out.tokens[b, 0, n:]) == -1).all()
    # With 25 beams over 85 sequences the whole top 25 is exact.
    np.testing.assert_allclose(out.scores[b], [s for _, s in ranked[:k]], atol=1e-5)
    early += sum(len(seq) < length for seq, _ in ranked[:k])
  assert early > 0  # hypotheses ended by eos compete with full-length ones


def test_beam_argument_errors():
  m = model(LLAMA)
  with pytest.raises(ValueError, match='early_stopping'):
    beam_search(m, PROMPTS, num_beams=2, max_new_tokens=2, early_stopping='sometimes')
  with pytest.raises(ValueError, match='num_beams'):
    beam_search(m, PROMPTS, num_beams=0, max_new_tokens=2)
  with pytest.raises(ValueError, match='beam_search_seq2seq'):
    beam_search(model(T5), PROMPTS, num_beams=2, max_new_tokens=2)


def test_t5_beam_search_equals_hf_generate():
  """Same hypotheses and sequence scores as transformers' beam search (converted T5)."""
  import torch
  import transformers

  from jaxformer.interop.hf import from_hf

  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=None, feed_forward_proj='gated-gelu',
                                 tie_word_embeddings=False, attn_implementation='eager')
  hf = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # a wide spread of weights keeps the logits far from ties
    for p in hf.parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) * 2.0 / p.shape[-1] ** 0.5)
  _, ours = from_hf(hf)
  srcs, k, n, lp = [[9, 33, 57, 21, 4, 70], [5, 6, 7, 0, 0, 0]], 4, 10, 0.6
  lengths = [6, 3]
  mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
  kw = dict(attention_mask=mask, max_new_tokens=n, do_sample=False)
  with torch.no_grad():
    greedy = hf.generate(torch.tensor(srcs), num_beams=1, min_new_tokens=n, eos_token_id=None,
                         **kw)
    # Two eos ids (C = 3K candidates per step), taken from the greedy paths so beams end.
    eos = [int(greedy[0, 3]), int(greedy[1, 5])]
    ref = hf.generate(torch.tensor(srcs), num_beams=k, num_return_sequences=k,
                      eos_token_id=eos, length_penalty=lp, early_stopping=False,
                      return_dict_in_generate=True, output_scores=True, **kw)
  want = ref.sequences[:, 1:].numpy().reshape(2, k, -1)
  out = beam_search_seq2seq(ours, (jnp.array(srcs), jnp.array(lengths)), start_id=0,
                            num_beams=k, max_new_tokens=n, stop_tokens=eos, length_penalty=lp)
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  ended = np.zeros(2, int)
  for b in range(2):
    for h in range(k):
      m = lens[b, h]
      np.testing.assert_array_equal(toks[b, h, :m], want[b, h, :m])
      # HF fills after the end with `pad_token_id or eos[0]`, i.e. eos[0] when the pad id is 0.
      assert (want[b, h, m:] == eos[0]).all() and (toks[b, h, m:] == 0).all()
      if m < n:
        assert toks[b, h, m - 1] in eos
        ended[b] += 1
  assert ended.all()  # every input has hypotheses ended by an eos
  np.testing.assert_allclose(out.scores, ref.sequences_scores.numpy().reshape(2, k), rtol=1e-4,
                             atol=1e-4)
