"""Sampling rules against numpy, and cached generation against the uncached model (CATALOG G):
greedy decoding equals the argmax of the full forward pass recomputed step by step, batched
prompts of different lengths decode as each prompt alone, stop tokens end rows, sampling is
seeded, and the decode loop is traced once (no Python loop per token)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.inference import decode, sampling
from jaxformer.inference import generate, generate_seq2seq
from jaxformer.models import build_model, family
from jaxformer.models.decoder import DecoderLM

TINY = dict(vocab_size=61, d_model=32, num_layers=2, max_length=64)
# Large init scales make next-token distributions peaked, so argmax comparisons are not ties.
MODELS = {
    'llama_gqa_window': family('llama', **TINY, init_std=0.5,
                               attention=dict(num_heads=4, num_kv_heads=2, window=3)),
    'gpt2': family('gpt2', **TINY, init_std=0.3, attention=dict(num_heads=4)),
    't5': family('t5', **TINY, init_std=1.0, attention=dict(num_heads=4)),
    'bart': family('bart', **TINY, init_std=0.3, attention=dict(num_heads=4)),
}
START = {'t5': 0, 'bart': 2}
PROMPTS = [[5, 9, 13], [7], [11, 3, 8, 20, 4, 6, 2]]
N = 8


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def kept(logits):
  return np.isfinite(np.asarray(logits))


# One compiled program per setting is cheaper than many small eager ops.
jit_sample = jax.jit(sampling.sample, static_argnames=('temperature', 'top_k', 'top_p'))
top_k_filter = jax.jit(sampling.top_k_filter, static_argnums=1)
top_p_filter = jax.jit(sampling.top_p_filter, static_argnums=1)


# =========================================================================== sampling
def test_greedy_and_temperature_zero():
  logits = jax.random.normal(jax.random.key(0), (4, 11))
  ref = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(sampling.greedy(logits), ref)
  np.testing.assert_array_equal(sampling.sample(logits, jax.random.key(1), temperature=0.0), ref)


def test_temperature_scales_logits():
  logits = jax.random.normal(jax.random.key(0), (3, 7))
  for tau in (0.5, 2.0):
    z = sampling.filter_logits(logits, temperature=tau)
    np.testing.assert_allclose(np_softmax(z), np_softmax(np.asarray(logits) / tau), atol=1e-6)
  with pytest.raises(ValueError, match='temperature'):
    sampling.sample(logits, jax.random.key(0), temperature=-1.0)


def test_top_k_keeps_exactly_k_largest_even_with_ties():
  logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0],
                      [0.5, -1.0, 4.0, 2.0, 2.0, 1.0]])
  for k in (1, 2, 3, 5):
    mask = kept(top_k_filter(logits, k))
    np.testing.assert_array_equal(mask.sum(-1), [k, k])
    for row, m in zip(np.asarray(logits), mask):
      # Every kept logit is >= every removed logit.
      assert row[m].min() >= (row[~m].max() if (~m).any() else -np.inf)
  np.testing.assert_array_equal(sampling.top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_minimal_nucleus():
  logits = jax.random.normal(jax.random.key(3), (64, 10)) * 2.0
  for p in (0.05, 0.3, 0.7, 0.95):
    mask = kept(top_p_filter(logits, p))
    probs = np_softmax(logits)
    for row, m in zip(probs, mask):
      assert m[np.argmax(row)]  # the top token is always kept
      mass = row[m].sum()
      assert mass >= p - 1e-6
      # Minimal: dropping the least likely kept token falls below p, and no removed token is
      # more likely than a kept one.
      assert mass - row[m].min() < p
      assert (~m).sum() == 0 or row[~m].max() <= row[m].min()
  np.testing.assert_array_equal(sampling.top_p_filter(logits, 1.0), logits)


def test_sample_frequencies_match_numpy_distribution():
  logits = jnp.array([2.0, 1.5, 1.0, 0.2, -0.5, 0.8])
  tau, k, p = 0.7, 4, 0.9
  # numpy reference: temperature, top-k, then the nucleus of the renormalised distribution.
  z = np.asarray(logits, np.float64) / tau
  z[np.argsort(-z)[k:]] = -np.inf
  probs = np_softmax(z)
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  keep = np.zeros(6, bool)
  keep[order[before < p]] = True
  ref = np.where(keep, probs, 0.0)
  ref /= ref.sum()
  n = 40000
  draws = jit_sample(jnp.broadcast_to(logits, (n, 6)), jax.random.key(7), temperature=tau,
                          top_k=k, top_p=p)
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  assert (freq[~keep] == 0).all()
  np.testing.assert_allclose(freq, ref, atol=0.012)


def test_sampling_is_seeded():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  a = jit_sample(logits, jax.random.key(1), temperature=1.0, top_k=20, top_p=0.9)
  b = jit_sample(logits, jax.random.key(1), temperature=1.0, top_k=20, top_p=0.9)
  c = jit_sample(logits, jax.random.key(2), temperature=1.0, top_k=20, top_p=0.9)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


# =========================================================================== generation
@functools.cache
def model(name, seed=0):
  return build_model(MODELS[name], seed=seed)


def reference_greedy(m, name, prompts, n):
  """Greedy tokens and their log-probabilities from full uncached forward passes, one per new
  token. Rows are right-padded to a fixed length; causality makes the padding irrelevant."""
  b = len(prompts)
  if MODELS[name].family == 'decoder':
    buf = np.zeros((b, max(map(len, prompts)) + n), np.int32)
    for i, p in enumerate(prompts):
      buf[i, :len(p)] = p
    ends = np.array([len(p) for p in prompts])
    fwd = nnx.jit(lambda m, x: m(x).logits)
    call = lambda buf: fwd(m, jnp.asarray(buf))
  else:
    src = np.zeros((b, max(map(len, prompts))), np.int32)
    seg = np.zeros_like(src)
    for i, p in enumerate(prompts):
      src[i, :len(p)], seg[i, :len(p)] = p, 1
    buf = np.zeros((b, n + 1), np.int32)
    buf[:, 0] = START[name]
    ends = np.ones(b, int)
    fwd = nnx.jit(lambda m, s, g, x: m(s, x, encoder_segment_ids=g).logits)
    call = lambda buf: fwd(m, jnp.asarray(src), jnp.asarray(seg), jnp.asarray(buf))
  toks, lps = [], []
  for _ in range(n):
    logits = np.asarray(call(buf))[np.arange(b), ends - 1].astype(np.float64)
    top2 = np.sort(logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, 'near tie: the comparison would be fragile'
    tok = logits.argmax(-1)
    lps.append(np.log(np_softmax(logits))[np.arange(b), tok])
    toks.append(tok)
    buf[np.arange(b), ends] = tok
    ends = ends + 1
  return np.stack(toks, 1), np.stack(lps, 1)


@pytest.mark.parametrize('name', ['llama_gqa_window', 't5', 'bart'])
def test_greedy_equals_argmax_of_uncached_forward(name):
  m = model(name)
  if MODELS[name].family == 'decoder':
    out = generate(m, PROMPTS, max_new_tokens=N)
  else:
    out = generate_seq2seq(m, PROMPTS, start_id=START[name], max_new_tokens=N)
  ref_tok, ref_lp = reference_greedy(m, name, PROMPTS, N)
  chex.assert_shape(out.tokens, (3, N))
  np.testing.assert_array_equal(out.tokens, ref_tok)
  np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-5)
  np.testing.assert_array_equal(out.lengths, [N] * 3)
  assert int(out.steps) == N and not np.asarray(out.stopped).any()


def test_batched_prompts_equal_each_prompt_alone():
  m = model('gpt2', seed=1)
  prompts = [[4, 8, 15, 16, 23, 42], [7, 1]]
  batched = generate(m, prompts, max_new_tokens=N)
  # The short prompt is left-padded by 4 in the batch; alone it has no padding.
  alone = generate(m, [prompts[1]], max_new_tokens=N)
  np.testing.assert_array_equal(batched.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(batched.logprobs[1], alone.logprobs[0], atol=1e-5)
  # The array form (right-padded tokens, lengths) is the same batch.
  arr = jnp.array([prompts[0], prompts[1] + [33] * 4])
  again = generate(m, (arr, jnp.array([6, 2])), max_new_tokens=N)
  np.testing.assert_array_equal(again.tokens, batched.tokens)


def test_stop_tokens_end_rows_and_the_loop():
  m = model('llama_gqa_window')
  free = np.asarray(generate(m, PROMPTS, max_new_tokens=N).tokens)
  stop = int(free[0, 2])
  out = generate(m, PROMPTS, max_new_tokens=N, stop_tokens=[stop], pad_id=-1)
  toks = np.asarray(out.tokens)
  for r in range(3):
    hits = np.flatnonzero(free[r] == stop)
    end = hits[0] + 1 if hits.size else N
    np.testing.assert_array_equal(toks[r, :end], free[r, :end])
    assert (toks[r, end:] == -1).all()
    assert int(out.lengths[r]) == end and bool(out.stopped[r]) == bool(hits.size)
    assert (np.asarray(out.logprobs)[r, end:] == 0).all()
  # When every row has stopped, the loop ends early.
  firsts = tuple(sorted(set(free[:, 1].tolist())))
  early = generate(m, PROMPTS, max_new_tokens=N, stop_tokens=firsts)
  assert int(early.steps) <= 2 and np.asarray(early.stopped).all()
  np.testing.assert_array_equal(np.asarray(early.tokens)[:, 2:], 0)


def test_decode_loop_is_traced_once_and_sampling_is_seeded(monkeypatch):
  calls = []
  original = DecoderLM.__call__

  def counting(self, *a, **kw):
    calls.append(1)
    return original(self, *a, **kw)

  monkeypatch.setattr(DecoderLM, '__call__', counting)
  m = model('gpt2', seed=2)
  # A shape no other test uses, so the first call compiles.
  prompts = [[1, 2, 3, 4, 5], [6, 7], [8], [9, 10, 11]]
  kw = dict(max_new_tokens=11, temperature=1.0, top_k=20, top_p=0.95)
  a = generate(m, prompts, seed=0, **kw)
  # One prefill call and one loop body, however many tokens are generated.
  assert len(calls) == 2
  b = generate(m, prompts, seed=0, **kw)
  c = generate(m, prompts, seed=1, **kw)
  generate(m, [[3, 3], [4, 4, 4, 4, 4], [5, 5, 5], [6]], seed=2, **kw)
  assert len(calls) == 2  # same shapes and settings: no retrace
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  assert np.isfinite(np.asarray(a.logprobs)).all()


def test_argument_errors():
  m = model('gpt2')
  with pytest.raises(ValueError, match='at least one token'):
    generate(m, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match='max_new_tokens'):
    generate(m, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match='generate_seq2seq'):
    generate(model('t5'), [[1]], max_new_tokens=2)
  with pytest.raises(ValueError, match='max_length'):
    generate(m, [[1] * 10], max_new_tokens=60)
