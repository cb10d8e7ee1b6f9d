"""Beam search with a length penalty, in one compiled loop (CATALOG G).

The algorithm and its conventions are those of Hugging Face `generate(num_beams=K)` (the
vectorised beam search of transformers >= 4.50), so scores and stopping agree with it:

- K running beams per input; each step scores all K * V continuations by their summed
  log-probability and keeps the best C = max(2, 1 + #eos) * K candidates, so that K of them
  can continue even when some end.
- A candidate that ends (emits an eos / stop token, or reaches max_new_tokens) and is among the
  best K of the C becomes a finished hypothesis with the score

      score(y) = sum_t log p(y_t | x, y_<t) / |y| ** length_penalty

  where |y| counts the generated tokens, the eos included (HF's `length_penalty`; GNMT's
  ((5 + |y|) / 6) ** alpha (Wu et al. 2016) is a different normalisation). The best K finished
  hypotheses are kept; the best K unfinished candidates continue.
- early_stopping=True: an input is done once it has K finished hypotheses. False: done once the
  best running beam, normalised by the current length, cannot beat the worst finished one.
  'never': the same bound taken at max length when length_penalty > 0 (an exact bound, so with
  enough beams the search is exhaustive).

The KV cache is reordered by the selected parent beams each step (gather along its batch axis).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxformer.inference import decode

NEG = -1.0e9  # HF's "very large negative" score for masked beams


@struct.dataclass
class BeamOutput:
  """tokens [B, K, N] int32: finished hypotheses, best first (pad_id after the end);
  scores [B, K]: length-penalised log-probabilities (about -1e9 where fewer than K hypotheses
  finished); lengths [B, K]: generated tokens, eos included; steps: decoding steps run."""
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array
  steps: jax.Array


@dataclasses.dataclass(frozen=True)
class BeamSettings:
  num_beams: int
  max_new_tokens: int
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.num_beams < 1:
      raise ValueError(f'num_beams={self.num_beams} is invalid: use >= 1')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} is invalid: use >= 1')
    if self.early_stopping not in (True, False, 'never'):
      raise ValueError(f'early_stopping={self.early_stopping!r} is invalid: allowed values are '
                       f'True, False, "never"')

  @property
  def candidates(self) -> int:
    return max(2, 1 + len(self.stop_tokens)) * self.num_beams


def _take(x, idx):
  """x [B, C, ...], idx [B, K] -> x[b, idx[b, k], ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def reorder_cache(cache, index, axis_fn):
  """Gathers rows `index` [B'] along every cache leaf's batch axis (None: shared leaf)."""
  def gather(path, leaf):
    ax = axis_fn(path, leaf)
    return leaf if ax is None else jnp.take(leaf, index, axis=ax)
  return jax.tree_util.tree_map_with_path(gather, cache)


def _select(i, logits, st, s: BeamSettings):
  """One beam step from next-token logits [B*K, V]; returns the new state, the parent row of
  each new running beam [B*K], its new token [B*K] and whether any input can still improve."""
  run_seq, run_score, seqs, scores, finished, fin_len, unsat = st
  b, k, n = run_seq.shape
  v = logits.shape[-1]
  c, lp = s.candidates, s.length_penalty
  logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v) + run_score[..., None]
  top_lp, top_idx = jax.lax.top_k(logp.reshape(b, k * v), c)
  parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
  cand = _take(run_seq, parent).at[:, :, i].set(tok)
  hits = i + 1 >= n
  if s.stop_tokens:
    hits = hits | jnp.isin(tok, jnp.asarray(s.stop_tokens, jnp.int32))
  hits = jnp.broadcast_to(hits, tok.shape)

  # The best K candidates that have not ended keep running.
  run_lp = top_lp + jnp.where(hits, NEG, 0.0)
  _, keep = jax.lax.top_k(run_lp, k)
  run_seq, run_score, run_parent = _take(cand, keep), _take(run_lp, keep), _take(parent, keep)

  # Candidates that ended among the best K join the finished hypotheses (best K kept).
  just = hits & (jnp.arange(c) < k)[None]
  fin = top_lp / jnp.asarray(i + 1, jnp.float32) ** lp
  if s.early_stopping is True:
    fin = fin + jnp.where(jnp.all(finished, -1, keepdims=True), NEG, 0.0)
  fin = fin + jnp.where(unsat[:, None], 0.0, NEG) + jnp.where(just, 0.0, NEG)
  merged = jnp.concatenate([scores, fin], 1)
  _, best = jax.lax.top_k(merged, k)
  seqs = _take(jnp.concatenate([seqs, cand], 1), best)
  scores = _take(merged, best)
  finished = _take(jnp.concatenate([finished, just], 1), best)
  fin_len = _take(jnp.concatenate([fin_len, jnp.full((b, c), i + 1, jnp.int32)], 1), best)

  # Can a running beam still beat the worst finished hypothesis?
  if s.early_stopping == 'never' and lp > 0:
    best_len = jnp.float32(n)
  else:
    best_len = jnp.asarray(i + 1, jnp.float32)
  best_possible = run_score[:, :1] / best_len ** lp
  worst = jnp.where(finished, jnp.min(scores, -1, keepdims=True), NEG)
  unsat = unsat & jnp.any(best_possible > worst, -1)
  go = jnp.any(unsat) & ~jnp.all(hits)
  if s.early_stopping is True:
    go = go & ~jnp.all(finished)

  rows = (jnp.arange(b)[:, None] * k + run_parent).reshape(-1)
  new_tok = jax.lax.dynamic_index_in_dim(run_seq, i, axis=2, keepdims=False).reshape(-1)
  return (run_seq, run_score, seqs, scores, finished, fin_len, unsat), rows, new_tok, go


def _beam_loop(feed, logits, cache, pos, axis_fn, s: BeamSettings):
  b, v = logits.shape
  k, n = s.num_beams, s.max_new_tokens
  if s.candidates > k * v:
    raise ValueError(f'beam search keeps {s.candidates} candidates per step but only '
                     f'num_beams * vocab = {k * v} exist')
  expand = jnp.repeat(jnp.arange(b), k)
  cache, logits, pos = reorder_cache(cache, expand, axis_fn), logits[expand], pos[expand]
  st = (jnp.full((b, k, n), s.pad_id, jnp.int32),
        jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 is live at first
        jnp.full((b, k, n), s.pad_id, jnp.int32),
        jnp.full((b, k), NEG, jnp.float32),
        jnp.zeros((b, k), bool),
        jnp.zeros((b, k), jnp.int32),
        jnp.ones((b,), bool))
  st, rows, tok, go = _select(0, logits, st, s)
  cache = reorder_cache(cache, rows, axis_fn)

  def cond(state):
    i, go = state[0], state[1]
    return (i < n) & go

  def body(state):
    i, _, cache, tok, pos, st = state
    logits, cache = feed(cache, tok, pos)
    st, rows, tok, go = _select(i, logits, st, s)
    return i + 1, go, reorder_cache(cache, rows, axis_fn), tok, pos + 1, st

  state = (jnp.int32(1), go, cache, tok, pos, st)
  i, _, _, _, _, st = jax.lax.while_loop(cond, body, state)
  _, _, seqs, scores, _, fin_len, _ = st
  return BeamOutput(tokens=seqs, scores=scores, lengths=fin_len, steps=i)


@functools.partial(jax.jit, static_argnames=('graphdef', 'kind', 'settings'))
def _beam(graphdef, state, inputs, *, kind: str, settings: BeamSettings):
  model = nnx.merge(graphdef, state)
  logits, cache, pos, feed = decode.STARTS[kind](model, inputs, settings.max_new_tokens)
  return _beam_loop(feed, logits, cache, pos, decode.cache_batch_axis(kind), settings)


def beam_search(model, prompts: decode.Prompts, *, num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                stop_tokens: Sequence[int] = (), pad_id: int = 0) -> BeamOutput:
  """Beam search continuation of prompts for a decoder-only model (see `decode.generate` for
  the prompt formats). Returns the K best finished hypotheses per prompt, best first."""
  if decode.model_kind(model) != 'decoder':
    raise ValueError('beam_search is for decoder-only models; use beam_search_seq2seq')
  settings = BeamSettings(num_beams, max_new_tokens, float(length_penalty), early_stopping,
                          tuple(int(t) for t in stop_tokens), int(pad_id))
  graphdef, state = nnx.split(model)
  return _beam(graphdef, state, decode.pad_batch(prompts), kind='decoder', settings=settings)


def beam_search_seq2seq(model, src: decode.Prompts, *, start_id: int, num_beams: int,
                        max_new_tokens: int, length_penalty: float = 1.0,
                        early_stopping: bool | str = False, stop_tokens: Sequence[int] = (),
                        pad_id: int = 0) -> BeamOutput:
  """Beam search for an EncoderDecoder or RNNSeq2Seq model; `start_id` is the decoder start
  token (T5: 0, BART: 2), not part of the output. The source is encoded once per input and its
  cross-attention K/V are shared by the input's beams."""
  kind = decode.model_kind(model)
  if kind == 'decoder':
    raise ValueError('beam_search_seq2seq is for encoder-decoder models; use beam_search')
  settings = BeamSettings(num_beams, max_new_tokens, float(length_penalty), early_stopping,
                          tuple(int(t) for t in stop_tokens), int(pad_id))
  tokens, lengths = decode.pad_batch(src, name='source')
  graphdef, state = nnx.split(model)
  return _beam(graphdef, state, (tokens, lengths, jnp.int32(start_id)), kind=kind,
               settings=settings)
