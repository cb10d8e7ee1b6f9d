"""Pre-training noise functions on token arrays (numpy, one `np.random.Generator` each call).

- `mlm_mask`: BERT masked LM (Devlin et al. 2019, Sec. 3.1) with RoBERTa's dynamic masking
  (Liu et al. 2019, Sec. 4.1): every eligible position is selected with probability p (0.15);
  a selected token becomes <mask> with probability 0.8, a uniformly random regular token with
  probability 0.1 and stays unchanged with probability 0.1. The loss counts selected positions
  only. The pipeline calls it with a fresh generator per element and step, so an example gets a
  new mask every epoch. ELECTRA (Clark et al. 2020, pretrain_helpers.mask) uses
  `replace=(0.85, 0.0)`: <mask> with probability 0.85, unchanged otherwise.
- `span_corruption`: T5 (Raffel et al. 2020, Sec. 3.1.4; `random_spans_noise_mask`): a
  fraction `noise_density` of the tokens, in round(num_noise / mean_span) spans, is dropped
  from the inputs; each span becomes one sentinel in the inputs and the targets list
  sentinel_i followed by span i. The mask begins with a non-noise span, as in T5.
  `span_corruption_lengths` is T5's `random_spans_helper`: the raw length that corrupts to
  exactly `inputs_length` (with EOS) and the resulting targets length.
- `bart_noise`: BART text infilling (Lewis et al. 2020, Sec. 2.2): span lengths are drawn from
  Poisson(lambda=3) until they cover ceil(mask_ratio * n) tokens (the last one trimmed); each
  span is replaced by a single <mask>; a zero-length span inserts a <mask>. Spans do not
  overlap (fairseq's may). Optional sentence permutation shuffles the sentences (runs ending in
  a sentence-end id) before infilling.
"""

from __future__ import annotations

import math

import numpy as np


def mlm_mask(tokens: np.ndarray, rng: np.random.Generator, *, mask_id: int,
             regular_ids: range, eligible: np.ndarray, probability: float = 0.15,
             replace: tuple[float, float] = (0.8, 0.1)
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (inputs, targets, loss_mask); targets are the original tokens everywhere.

  `replace` = (p_mask, p_random): a selected token becomes <mask> with probability p_mask, a
  random regular token with p_random, and stays unchanged otherwise.
  """
  p_mask, p_random = replace
  tokens = np.asarray(tokens, np.int32)
  selected = (rng.random(tokens.shape) < probability) & eligible
  action = rng.random(tokens.shape)
  inputs = tokens.copy()
  to_mask = selected & (action < p_mask)
  to_random = selected & (action >= p_mask) & (action < p_mask + p_random)
  inputs[to_mask] = mask_id
  random_tokens = rng.integers(regular_ids.start, regular_ids.stop, tokens.shape, dtype=np.int32)
  inputs[to_random] = random_tokens[to_random]
  return inputs, tokens, selected.astype(np.int32)


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """T5's random_spans_helper: (raw tokens length, targets length), both counting one EOS."""

  def lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = lengths(tokens_length)
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def num_noise_spans(length: int, noise_density: float, mean_noise_span_length: float) -> int:
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return max(int(round(num_noise / mean_noise_span_length)), 1)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Lengths of a uniformly random partition of num_items into num_segments non-empty runs."""
  first = np.zeros(num_items, bool)
  first[1 + rng.permutation(num_items - 1)[:num_segments - 1]] = True
  segment = np.cumsum(first)
  return np.bincount(segment, minlength=num_segments)


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0) -> np.ndarray:
  """T5's random_spans_noise_mask: bool[length], True on noise; starts with non-noise."""
  if length < 2:
    return np.zeros(length, bool)
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  spans = num_noise_spans(length, noise_density, mean_noise_span_length)
  spans = min(spans, num_noise, length - num_noise)
  noise_lengths = _random_segmentation(num_noise, spans, rng)
  keep_lengths = _random_segmentation(length - num_noise, spans, rng)
  interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.arange(2 * spans) % 2 == 1, interleaved)


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, sentinel, *,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Returns (inputs, targets) without EOS; `sentinel(i)` gives the id of the i-th sentinel."""
  tokens = np.asarray(tokens, np.int32)
  noise = noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  return _replace_spans(tokens, noise, sentinel), _replace_spans(tokens, ~noise, sentinel)


def _replace_spans(tokens, drop, sentinel):
  """Each run of `drop` becomes one sentinel (numbered in order); other tokens stay."""
  starts = drop & ~np.concatenate([[False], drop[:-1]])
  out = tokens.copy()
  idx = np.flatnonzero(starts)
  out[idx] = [sentinel(i) for i in range(len(idx))]
  return out[~drop | starts]


def merge_span_corruption(inputs: np.ndarray, targets: np.ndarray, is_sentinel) -> np.ndarray:
  """Inverse of `span_corruption`: puts each target span back at its sentinel."""
  spans, current = {}, None
  for t in targets:
    if is_sentinel(t):
      current = int(t)
      spans[current] = []
    elif current is not None:
      spans[current].append(int(t))
  out = []
  for t in inputs:
    out.extend(spans.get(int(t), []) if is_sentinel(t) else [int(t)])
  return np.asarray(out, np.int32)


def _permute_sentences(tokens, rng, sentence_ends):
  ends = np.flatnonzero(np.isin(tokens, list(sentence_ends))) + 1
  bounds = np.concatenate([[0], ends[ends < len(tokens)], [len(tokens)]])
  sentences = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
  order = rng.permutation(len(sentences))
  return np.concatenate([sentences[i] for i in order]) if sentences else tokens


def bart_noise(tokens: np.ndarray, rng: np.random.Generator, *, mask_id: int,
               mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
               permute_sentences: bool = False, sentence_ends=()) -> np.ndarray:
  """Returns the noised tokens (no BOS/EOS added)."""
  tokens = np.asarray(tokens, np.int32)
  if permute_sentences:
    tokens = _permute_sentences(tokens, rng, sentence_ends)
  n = len(tokens)
  num_to_mask = math.ceil(mask_ratio * n)
  if n == 0 or num_to_mask == 0:
    return tokens
  lengths = []
  while sum(lengths) < num_to_mask:
    lengths.append(int(rng.poisson(poisson_lambda)))
  lengths[-1] -= sum(lengths) - num_to_mask
  lengths = rng.permutation(lengths)
  kept = n - num_to_mask
  # Spans go into the kept sequence's kept + 1 gaps; a sorted draw with replacement puts
  # them in order, so consecutive spans can share a gap (two adjacent masks).
  gaps = np.sort(rng.integers(0, kept + 1, len(lengths)))
  # Place spans: walk the kept tokens, emitting spans whose gap index is reached.
  out, pos, span = [], 0, 0
  for gap in range(kept + 1):
    while span < len(lengths) and gaps[span] == gap:
      out.append(mask_id)
      pos += lengths[span]
      span += 1
    if gap < kept:
      out.append(int(tokens[pos]))
      pos += 1
  return np.asarray(out, np.int32)
