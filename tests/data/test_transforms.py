"""MLM masking, T5 span corruption and BART noising against their definitions."""

import itertools
import math

import numpy as np
import pytest

from jaxformer.data import transforms

MASK = 3
REGULAR = range(4, 260)


def _binomial_ok(count, n, p, sigmas=5.0):
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mlm_rates_are_15_percent_and_80_10_10():
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 260, 200_000, dtype=np.int32)
  eligible = rng.random(tokens.shape) < 0.9
  inputs, targets, selected = transforms.mlm_mask(
      tokens, np.random.default_rng(1), mask_id=MASK, regular_ids=REGULAR, eligible=eligible)
  sel = selected.astype(bool)
  np.testing.assert_array_equal(targets, tokens)
  assert not sel[~eligible].any()
  np.testing.assert_array_equal(inputs[~sel], tokens[~sel])  # unselected positions untouched
  n = int(eligible.sum())
  assert _binomial_ok(sel.sum(), n, 0.15)
  k = int(sel.sum())
  masked = inputs[sel] == MASK
  changed = (inputs[sel] != tokens[sel]) & ~masked
  kept = inputs[sel] == tokens[sel]
  assert _binomial_ok(masked.sum(), k, 0.8)
  assert _binomial_ok(changed.sum(), k, 0.1 * 255 / 256)
  assert _binomial_ok(kept.sum(), k, 0.1 + 0.1 / 256)
  assert np.isin(inputs[sel & (inputs != MASK)], REGULAR).all()


def test_electra_masking_is_85_percent_mask_and_15_unchanged():
  rng = np.random.default_rng(2)
  tokens = rng.integers(4, 260, 100_000, dtype=np.int32)
  inputs, _, selected = transforms.mlm_mask(
      tokens, np.random.default_rng(3), mask_id=MASK, regular_ids=REGULAR,
      eligible=np.ones(tokens.shape, bool), replace=(0.85, 0.0))
  sel = selected.astype(bool)
  assert _binomial_ok(sel.sum(), tokens.size, 0.15)
  masked = inputs[sel] == MASK
  assert _binomial_ok(masked.sum(), int(sel.sum()), 0.85)
  np.testing.assert_array_equal(inputs[sel][~masked], tokens[sel][~masked])  # no random tokens
  np.testing.assert_array_equal(inputs[~sel], tokens[~sel])


def test_mlm_is_dynamic_and_seeded():
  tokens = np.arange(4, 260, dtype=np.int32)
  eligible = np.ones(tokens.shape, bool)
  run = lambda seed: transforms.mlm_mask(tokens, np.random.default_rng(seed), mask_id=MASK,
                                         regular_ids=REGULAR, eligible=eligible)
  np.testing.assert_array_equal(run(5)[0], run(5)[0])
  assert not np.array_equal(run(5)[2], run(6)[2])


def test_t5_lengths_match_the_t5_helper():
  # T5's pre-training setting: inputs 512 come from 568 raw tokens, targets are 114.
  assert transforms.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
  assert transforms.span_corruption_lengths(64, 0.15, 3.0)[0] > 64


@pytest.mark.parametrize('length', [2, 7, 64, 568])
def test_span_corruption_round_trip(length):
  rng = np.random.default_rng(length)
  vocab = 400
  sentinel = lambda i: vocab - 1 - i
  is_sentinel = lambda t: t >= 300
  for _ in range(20):
    tokens = rng.integers(4, 260, length, dtype=np.int32)
    inputs, targets = transforms.span_corruption(tokens, rng, sentinel)
    np.testing.assert_array_equal(transforms.merge_span_corruption(inputs, targets, is_sentinel),
                                  tokens)
    noise = int(round(length * 0.15))
    noise = min(max(noise, 1), length - 1)
    spans = int(sum(is_sentinel(t) for t in inputs))
    assert len(targets) - spans == noise  # exactly the noise tokens move to the targets
    assert spans == int(sum(is_sentinel(t) for t in targets))
    assert spans == min(max(round(noise / 3.0), 1), noise, length - noise)
    assert not is_sentinel(inputs[0])  # the mask starts with a non-noise span
    assert [t for t in inputs if is_sentinel(t)] == [sentinel(i) for i in range(spans)]
  if length == 568:
    assert len(inputs) + 1 == 512 and len(targets) + 1 == 114


def test_noise_span_lengths_average_three():
  rng = np.random.default_rng(0)
  runs = []
  for _ in range(200):
    mask = transforms.noise_mask(568, rng)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    runs += list(edges[1::2] - edges[0::2])
  assert 2.8 < np.mean(runs) < 3.2


def test_bart_infilling_invariants():
  rng = np.random.default_rng(0)
  ratios = []
  for _ in range(300):
    tokens = rng.integers(4, 260, 100, dtype=np.int32)
    noised = transforms.bart_noise(tokens, rng, mask_id=MASK)
    kept = noised[noised != MASK]
    assert len(kept) == 100 - math.ceil(0.3 * 100)  # exactly 30% of the tokens removed
    assert (noised == MASK).sum() >= 1
    ratios.append(30 / (noised == MASK).sum())
  # Each mask replaces one Poisson(3) span; zero-length spans (insertions) count too.
  assert 2.7 < np.mean(ratios) < 3.4


def test_bart_masks_contiguous_spans_in_order():
  tokens = np.arange(4, 104, dtype=np.int32)  # distinct, so positions are recoverable
  rng = np.random.default_rng(1)
  for _ in range(50):
    noised = transforms.bart_noise(tokens, rng, mask_id=MASK)
    kept = noised[noised != MASK]
    assert np.all(np.diff(kept) > 0)
    # Kept tokens are a subsequence in order, and wherever original tokens are missing
    # between two kept ones, the noised sequence has a mask there.
    idx = np.flatnonzero(noised != MASK)
    bounds = zip(np.concatenate([[-1], idx]), np.concatenate([idx, [len(noised)]]))
    gaps = np.diff(np.concatenate([[3], kept, [104]])) > 1
    has_mask = [MASK in noised[a + 1:b] for a, b in bounds]
    assert all(m for g, m in zip(gaps, has_mask) if g)


def test_bart_sentence_permutation_keeps_sentences():
  tokens = np.asarray([5, 6, 9, 7, 9, 8, 8, 8, 9, 10], np.int32)  # 9 ends a sentence
  sentences = [(5, 6, 9), (7, 9), (8, 8, 8, 9), (10,)]
  concatenations = {sum(p, ()) for p in itertools.permutations(sentences)}
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    out = transforms.bart_noise(tokens, rng, mask_id=MASK, mask_ratio=0.0,
                                permute_sentences=True, sentence_ends={9})
    assert MASK not in out
    assert tuple(out.tolist()) in concatenations
    seen.add(tuple(out.tolist()))
  assert len(seen) > 5
