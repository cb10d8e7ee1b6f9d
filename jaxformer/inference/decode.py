"""Autoregressive generation with a KV cache in one compiled loop (CATALOG G).

    y_0 ~ pi(. | x)                 prefill: one call over the whole (left-padded) prompt
    y_i ~ pi(. | x, y_<i)           one cached call per new token, inside `jax.lax.while_loop`

where pi is greedy / temperature / top-k / top-p selection (`sampling.sample`).

Prompts of different lengths share one batch: they are left-aligned into [B, P] with padding on
the left (segment id 0, never attended to) and per-row positions that start at 0 at each row's
first real token, so every row decodes exactly as it would alone. A row that emits a stop
token is finished: later positions hold `pad_id` and the loop ends early once every row is
finished.

The model is split with `nnx.split` and merged inside one `jax.jit`-compiled function whose
static arguments are the graph definition and the decoding settings, so a model compiles once
per (batch, prompt length, settings) and the loop body is traced once.

Encoder-decoders (T5, BART, the original Transformer) encode the source once, precompute every
layer's cross-attention K/V into the cache, and start the target from a decoder start token
(T5: the pad id 0; BART: the eos id 2). The RNN encoder-decoder uses its recurrent state as
the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxformer.inference import sampling

Prompts = Sequence[Sequence[int]] | tuple[jax.Array, jax.Array]


@struct.dataclass
class GenerateOutput:
  """tokens [B, N] int32 (pad_id after a row's end); lengths [B]: generated tokens per row,
  the stop token included; stopped [B]: the row ended with a stop token; logprobs [B, N]:
  log pi(y_i | ...) of the model's (unfiltered) distribution, 0 after the end; steps: decoding
  steps run (< N when every row stopped early)."""
  tokens: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  logprobs: jax.Array
  steps: jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static decoding settings (part of the compiled function's cache key)."""
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} is invalid: use >= 1')
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} is invalid: use >= 0 (0 means greedy)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} is invalid: use 0 < top_p <= 1')


# =========================================================================== inputs
def pad_batch(seqs: Prompts, *, name: str = 'prompt') -> tuple[jax.Array, jax.Array]:
  """list of token lists, or (tokens [B, T], lengths [B]) -> right-padded (tokens, lengths).

  In the array form row b is tokens[b, :lengths[b]]. Padding values are 0 (never attended).
  """
  if isinstance(seqs, tuple) and len(seqs) == 2 and hasattr(seqs[0], 'shape'):
    tokens, lengths = jnp.asarray(seqs[0], jnp.int32), jnp.asarray(seqs[1], jnp.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f'{name}s as arrays must be (tokens [B, T], lengths [B]); got shapes '
                       f'{tokens.shape} and {lengths.shape}')
    if not isinstance(lengths, jax.core.Tracer):
      ln = np.asarray(lengths)
      if (ln < 1).any() or (ln > tokens.shape[1]).any():
        raise ValueError(f'{name} lengths must be in [1, {tokens.shape[1]}]; got {ln.tolist()}')
    return tokens, lengths
  seqs = [list(s) for s in seqs]
  if not seqs or any(len(s) == 0 for s in seqs):
    raise ValueError(f'every {name} needs at least one token (e.g. BOS); got lengths '
                     f'{[len(s) for s in seqs]}')
  t = max(len(s) for s in seqs)
  out = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return jnp.asarray(out), jnp.asarray([len(s) for s in seqs], jnp.int32)


def left_align(tokens: jax.Array, lengths: jax.Array):
  """Right-padded [B, T] -> left-padded tokens, segment ids (0 = padding), positions."""
  t = tokens.shape[1]
  shift = t - lengths[:, None]
  idx = jnp.arange(t)[None] - shift
  valid = idx >= 0
  left = jnp.where(valid, jnp.take_along_axis(tokens, jnp.maximum(idx, 0), axis=1), 0)
  return left, valid.astype(jnp.int32), jnp.maximum(idx, 0).astype(jnp.int32)


# =========================================================================== model adapters
# A start function runs the model on its inputs and returns (logits [B, V] of the first new
# token, cache, next position [B], feed), where feed(cache, tokens [B], positions [B]) ->
# (logits [B, V], cache) runs one cached step inside a loop body. NNX modules may not cross
# trace levels, so feed re-merges the model from its split state inside the body.

def _remerge(model):
  graphdef, state = nnx.split(model)
  # Rebuilding the state's leaves makes Variables that belong to the caller's trace.
  return lambda: nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


def start_decoder(model, inputs, n: int):
  tokens, lengths = inputs
  left, seg, pos = left_align(tokens, lengths)
  b, p = left.shape
  cache = model.init_cache(b, p + n - 1)
  out = model(left, segment_ids=seg, positions=pos, cache=cache)
  merged = _remerge(model)

  def feed(cache, tok, pos):
    out = merged()(tok[:, None], segment_ids=jnp.ones((tok.shape[0], 1), jnp.int32),
                positions=pos[:, None], cache=cache)
    return out.logits[:, 0], out.cache

  return out.logits[:, -1], out.cache, lengths, feed


def start_seq2seq(model, inputs, n: int):
  src, lengths, start_id = inputs
  b, s = src.shape
  seg = (jnp.arange(s)[None] < lengths[:, None]).astype(jnp.int32)
  enc, enc_seg, _ = model.encode(src, segment_ids=seg)
  cache = model.init_cache(b, n, enc, enc_seg)
  merged = _remerge(model)

  def feed(cache, tok, pos):
    # Cross-attention reads its K/V (and the source padding) from the cache.
    out = merged().decode(tok[:, None], None, positions=pos[:, None], cache=cache)
    return out.logits[:, 0], out.cache

  first = jnp.full((b,), start_id, jnp.int32)
  logits, cache = feed(cache, first, jnp.zeros((b,), jnp.int32))
  return logits, cache, jnp.ones((b,), jnp.int32), feed


def start_rnn(model, inputs, n: int):
  del n
  src, lengths, start_id = inputs
  seg = (jnp.arange(src.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
  enc, valid, carry = model.encode(src, segment_ids=seg)
  merged = _remerge(model)

  def feed(state, tok, pos):
    del pos
    carry, enc, valid = state
    logits, carry, _ = merged().decode(tok[:, None], enc, valid, carry)
    return logits[:, 0], (carry, enc, valid)

  first = jnp.full((src.shape[0],), start_id, jnp.int32)
  logits, state = feed((carry, enc, valid), first, None)
  return logits, state, jnp.ones((src.shape[0],), jnp.int32), feed


def cache_batch_axis(kind: str) -> Callable[[tuple, jax.Array], int | None]:
  """Batch axis of each cache leaf: Transformer caches are stacked [groups, B, ...] with a
  shared write index; RNN states are [B, ...]."""
  if kind == 'rnn':
    return lambda path, leaf: 0
  def axis(path, leaf):
    last = path[-1]
    return None if getattr(last, 'key', None) == 'index' else 1
  return axis


def model_kind(model) -> str:
  """The family's generation strategy (a key of STARTS), from the family registry."""
  cfg = getattr(model, 'cfg', None)
  kind = cfg.family_spec.generation if cfg is not None else None
  if kind is None:
    raise ValueError(f'generation needs a model whose family generates (a decoder, '
                     f'encoder-decoder or RNN seq2seq); got {type(model).__name__} with '
                     f'family={getattr(cfg, "family", None)!r}')
  return kind


STARTS = {'decoder': start_decoder, 'seq2seq': start_seq2seq, 'rnn': start_rnn}


# =========================================================================== the loop
def _sample_loop(feed, logits, cache, pos, key, s: Settings):
  b, n = logits.shape[0], s.max_new_tokens
  stop = jnp.asarray(s.stop_tokens, jnp.int32)

  def pick(logits, i, done):
    tok = sampling.sample(logits, jax.random.fold_in(key, i), temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), tok[:, None],
                             axis=-1)[:, 0]
    tok = jnp.where(done, s.pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    hit = jnp.isin(tok, stop) if s.stop_tokens else jnp.zeros_like(done)
    return tok, lp, done | (hit & ~done)

  done = jnp.zeros((b,), bool)
  tok, lp, done = pick(logits, 0, done)
  tokens = jnp.full((b, n), s.pad_id, jnp.int32).at[:, 0].set(tok)
  logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(state):
    i, done = state[0], state[4]
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, cache, tok, pos, done, tokens, logprobs, lengths = state
    logits, cache = feed(cache, tok, pos)
    lengths = lengths + (~done).astype(jnp.int32)
    tok, lp, done = pick(logits, i, done)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
    return i + 1, cache, tok, pos + 1, done, tokens, logprobs, lengths

  state = (jnp.int32(1), cache, tok, pos, done, tokens, logprobs, lengths)
  i, _, _, _, done, tokens, logprobs, lengths = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=tokens, lengths=lengths, stopped=done, logprobs=logprobs,
                        steps=i)


@functools.partial(jax.jit, static_argnames=('graphdef', 'kind', 'settings'))
def _generate(graphdef, state, inputs, key, *, kind: str, settings: Settings):
  model = nnx.merge(graphdef, state)
  logits, cache, pos, feed = STARTS[kind](model, inputs, settings.max_new_tokens)
  return _sample_loop(feed, logits, cache, pos, key, settings)


# =========================================================================== public API
def generate(model, prompts: Prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0, seed: int | jax.Array = 0) -> GenerateOutput:
  """Continues each prompt of a decoder-only model (DecoderLM) by up to `max_new_tokens`.

  Args:
    model: a DecoderLM (GPT-2, LLaMA, Mistral, Mixtral configs).
    prompts: a list of token lists (lengths may differ, each >= 1), or (tokens [B, T],
      lengths [B]) with row b's prompt in tokens[b, :lengths[b]].
    max_new_tokens: N; prompt length + N - 1 must fit `model.cfg.max_length`.
    temperature: 0 selects greedily; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0: all). top_p: nucleus mass (1: all).
    stop_tokens: ids that end a row (the stop token is emitted; later positions are pad_id).
    pad_id: fill value of the output after a row has stopped.
    seed: integer seed or PRNG key; step i uses fold_in(key, i).
  """
  if model_kind(model) != 'decoder':
    raise ValueError(f'generate is for decoder-only models; use generate_seq2seq for '
                     f'{type(model).__name__}')
  inputs = pad_batch(prompts)
  settings = Settings(max_new_tokens, float(temperature), int(top_k), float(top_p),
                      tuple(int(t) for t in stop_tokens), int(pad_id))
  return _run(model, inputs, 'decoder', settings, seed)


def generate_seq2seq(model, src: Prompts, *, start_id: int, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     stop_tokens: Sequence[int] = (), pad_id: int = 0,
                     seed: int | jax.Array = 0) -> GenerateOutput:
  """Generates targets for an EncoderDecoder (T5, BART, Transformer) or RNNSeq2Seq model.

  `src` is a list of token lists or (tokens [B, S], lengths [B]) (right padding, segment id 0).
  `start_id` is the decoder start token (T5: 0, BART: 2); the output excludes it. Other
  arguments as in `generate`.
  """
  kind = model_kind(model)
  if kind == 'decoder':
    raise ValueError('generate_seq2seq is for encoder-decoder models; use generate')
  tokens, lengths = pad_batch(src, name='source')
  settings = Settings(max_new_tokens, float(temperature), int(top_k), float(top_p),
                      tuple(int(t) for t in stop_tokens), int(pad_id))
  return _run(model, (tokens, lengths, jnp.int32(start_id)), kind, settings, seed)


def _run(model, inputs, kind, settings, seed):
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, inputs, key, kind=kind, settings=settings)
