"""Beam search (CATALOG G): one beam is greedy decoding; with enough beams the search returns
exactly the best sequences found by enumerating every sequence of a vocabulary-5 model; the
reported scores are sum log p / length ** length_penalty recomputed by an uncached forward."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  eos = int(free.tokens[0, 3])
  greedy = generate_seq2seq(m, PROMPTS, start_id=0, max_new_tokens=N, stop_tokens=[eos])
  beam = beam_search_seq2seq(m, PROMPTS, start_id=0, num_beams=1, max_new_tokens=N,
                             stop_tokens=[eos], early_stopping=True)
  assert int(greedy.lengths[0]) <= 4
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
  np.testing.assert_allclose(beam.scores[:, 0],
                             np.asarray(greedy.logprobs).sum(1) / np.asarray(greedy.lengths),
                             atol=1e-5)


def brute_force(m, prompt, eos, length, lp):
  """{sequence: score} over every sequence that ends with eos or reaches `length` tokens."""
  v = m.cfg.vocab_size
  conts = np.array(list(itertools.product(range(v), repeat=length)), np.int32)
  x = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
  logits = np.asarray(m(jnp.asarray(x)).logits)[:, len(prompt) - 1:-1]
  lp_tok = np.take_along_axis(log_softmax(logits), conts[..., None], -1)[..., 0]
  cum = np.cumsum(lp_tok, 1)
  scores = {}
  for c, s in zip(conts, cum):
    for n in range(1, length + 1):
      if n == length or c[n - 1] == eos:
        scores[tuple(c[:n].tolist())] = s[n - 1] / n ** lp
        break
  return scores


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_enough_beams_find_the_brute_force_best(length_penalty):
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


def test_seq2seq_beam_scores_match_teacher_forced_forward():
  m = model(T5)
  free = generate_seq2seq(m, PROMPTS, start_id=0, max_new_tokens=N)
  eos, lp, k = int(free.tokens[0, 3]), 0.7, 3
  out = beam_search_seq2seq(m, PROMPTS, start_id=0, num_beams=k, max_new_tokens=N,
                            stop_tokens=[eos], length_penalty=lp, pad_id=0)
  toks, lengths, scores = map(np.asarray, (out.tokens, out.lengths, out.scores))
  assert (np.diff(scores, axis=1) <= 0).all()  # best first
  assert scores[:, 0].max() > -1e8
  # Teacher-forced scores of every hypothesis, all in one uncached forward.
  src = np.zeros((3 * k, max(map(len, PROMPTS))), np.int32)
  seg = np.zeros_like(src)
  for i, p in enumerate(PROMPTS):
    src[i * k:(i + 1) * k, :len(p)], seg[i * k:(i + 1) * k, :len(p)] = p, 1
  flat = toks.reshape(3 * k, N)
  dec_in = np.concatenate([np.zeros((3 * k, 1), np.int32), flat[:, :-1]], 1)
  logits = m(jnp.asarray(src), jnp.asarray(dec_in), encoder_segment_ids=jnp.asarray(seg)).logits
  tok_lp = np.take_along_axis(log_softmax(logits), flat[..., None], -1)[..., 0]
  ended = 0
  for h in range(3 * k):
    n = lengths.reshape(-1)[h]
    assert 1 <= n <= N
    if n < N:
      assert flat[h, n - 1] == eos and (flat[h, n:] == 0).all()
      ended += 1
    assert eos not in flat[h, :n - 1].tolist()
    np.testing.assert_allclose(scores.reshape(-1)[h], tok_lp[h, :n].sum() / n ** lp, atol=1e-5)
  assert ended > 0  # the eos path is exercised


def test_beam_argument_errors():
  m = model(LLAMA)
  with pytest.raises(ValueError, match='early_stopping'):
    beam_search(m, PROMPTS, num_beams=2, max_new_tokens=2, early_stopping='sometimes')
  with pytest.raises(ValueError, match='num_beams'):
    beam_search(m, PROMPTS, num_beams=0, max_new_tokens=2)
  with pytest.raises(ValueError, match='beam_search_seq2seq'):
    beam_search(model(T5), PROMPTS, num_beams=2, max_new_tokens=2)
