"""Synthetic sequence tasks with known answers: copy, reverse, sort, addition, and MQAR.

All examples are text, so one tokenizer (bytes by default) serves every task:
- copy / reverse / sort: `inputs` is a random string over `alphabet` with a length drawn
  uniformly from [min_length, max_length]; `targets` is the same string, reversed or sorted.
- addition: `inputs` is 'a+b' for two non-negative integers with uniformly drawn digit counts
  (1..max_digits), `targets` is their decimal sum.
- MQAR, multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3): `inputs` lists
  `num_kv_pairs` key-value pairs with distinct keys ('a1b7c3'); `targets` queries `num_queries`
  of those keys in random order, each followed by its value ('c3a1'), and `answer_mask` marks
  the value positions, the only ones the loss should count (1 per character, so tasks that use
  it need a tokenizer with one token per character, e.g. bytes).

`generate_*` functions are pure Python driven by one `random.Random(seed)`; the TFDS builders in
`jaxformer.data.builders` call them per split with a seed derived from the split name, and a
shared `seen` set keeps the splits disjoint (the test set never repeats a training example).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator

SEQ2SEQ_TASKS = ('copy', 'reverse', 'sort', 'addition')
LETTERS = string.ascii_lowercase
MQAR_KEYS = string.ascii_letters
MQAR_VALUES = string.digits + '!#$%&*+-/:<=>?@^_|~'


def make_pair(task: str, rng: random.Random, *, alphabet: str = LETTERS, min_length: int = 1,
              max_length: int = 32, max_digits: int = 10) -> tuple[str, str]:
  """Draws one (inputs, targets) pair of a seq2seq task."""
  if task == 'addition':
    a = int(''.join(rng.choice(string.digits) for _ in range(rng.randint(1, max_digits))))
    b = int(''.join(rng.choice(string.digits) for _ in range(rng.randint(1, max_digits))))
    return f'{a}+{b}', str(a + b)
  s = ''.join(rng.choice(alphabet) for _ in range(rng.randint(min_length, max_length)))
  if task == 'copy':
    return s, s
  if task == 'reverse':
    return s, s[::-1]
  if task == 'sort':
    return s, ''.join(sorted(s))
  raise ValueError(f'unknown synthetic task {task!r}; expected one of {SEQ2SEQ_TASKS}')


def make_mqar(rng: random.Random, *, num_kv_pairs: int = 8,
              num_queries: int | None = None) -> tuple[str, str, list[int]]:
  """Draws one MQAR example: (inputs, targets, answer_mask)."""
  num_queries = num_kv_pairs if num_queries is None else num_queries
  if not 1 <= num_queries <= num_kv_pairs <= len(MQAR_KEYS):
    raise ValueError(f'MQAR needs 1 <= num_queries={num_queries} <= num_kv_pairs={num_kv_pairs} '
                     f'<= {len(MQAR_KEYS)}')
  keys = rng.sample(MQAR_KEYS, num_kv_pairs)
  values = [rng.choice(MQAR_VALUES) for _ in keys]
  pairs = dict(zip(keys, values))
  queries = rng.sample(keys, num_queries)
  inputs = ''.join(k + v for k, v in pairs.items())
  targets = ''.join(q + pairs[q] for q in queries)
  return inputs, targets, [0, 1] * num_queries


def distinct(draw, rng: random.Random, num_examples: int, seen: set[bytes],
             max_tries_per_example: int = 1000) -> Iterator:
  """Yields `num_examples` draws whose first field is new; `seen` (digests) is updated."""
  tries = 0
  count = 0
  while count < num_examples:
    example = draw(rng)
    key = hashlib.sha1(example[0].encode()).digest()
    if key in seen:
      tries += 1
      if tries > max_tries_per_example * max(num_examples, 1):
        raise ValueError(f'could not draw {num_examples} distinct examples; the task space is '
                         'too small for the requested split sizes (raise max_length or lower '
                         'num_train / num_validation / num_test)')
      continue
    seen.add(key)
    count += 1
    yield example
