"""ListOps (Nangia & Bowman 2018) with the Long Range Arena generator rules (Tay et al. 2021).

An expression is a tree of list operators over digits 0-9, written in prefix form with a closing
bracket, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9. The label is the value of the whole expression.

Generator (LRA `lra_benchmarks/data/listops.py`): a node at depth < max_depth is a leaf digit
with probability 1 - VALUE_P = 0.75 and otherwise an operator with U{2..max_args} children; a
node at max_depth is always a leaf. An expression's length counts one token per digit plus two
per operator (its name and `]`); LRA keeps trees with min_length < length < max_length and
de-duplicates them. Operators: MIN, MAX, MED (int of the numpy median, i.e. the mean of the two
middle values rounded towards zero), SM (sum modulo 10). LRA uses Python's global `random`;
here one `random.Random(seed)` drives everything, so a seed reproduces the data set exactly.

LRA writes the tree with parentheses around every application; those carry no information
and double the length, so `to_string` writes the plain source form whose token count is the
generator's `length` (the token count the 500-2000 rule refers to).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')
END = ']'
VALUE_P = 0.25
TOKENS = tuple(str(d) for d in range(10)) + OPERATORS + (END,)

Tree = int | tuple  # a digit, or (operator, [children])


def generate_tree(rng: random.Random, depth: int, max_depth: int,
                  max_args: int) -> tuple[Tree, int]:
  """Returns (tree, length) following LRA's recursion (depth starts at 1)."""
  r = rng.random() if depth < max_depth else 1.0
  if r > VALUE_P:
    return rng.choice(range(10)), 1
  num_args = rng.randint(2, max_args)
  children, length = [], 2
  for _ in range(num_args):
    child, child_len = generate_tree(rng, depth + 1, max_depth, max_args)
    children.append(child)
    length += child_len
  return (rng.choice(OPERATORS), children), length


def to_string(tree: Tree) -> str:
  if isinstance(tree, int):
    return str(tree)
  op, children = tree
  return ' '.join([op, *(to_string(c) for c in children), END])


def apply_op(op: str, values: Sequence[int]) -> int:
  if op == '[MIN':
    return min(values)
  if op == '[MAX':
    return max(values)
  if op == '[MED':
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else int((s[n // 2 - 1] + s[n // 2]) / 2)
  if op == '[SM':
    return sum(values) % 10
  raise ValueError(f'unknown ListOps operator {op!r}; expected one of {OPERATORS}')


def evaluate(source: str) -> int:
  """Evaluates a source string with an explicit stack (independent of the tree recursion)."""
  stack: list[list] = []
  result = None
  for tok in source.split():
    if tok in OPERATORS:
      stack.append([tok])
    elif tok == END:
      op, *values = stack.pop()
      value = apply_op(op, values)
      if stack:
        stack[-1].append(value)
      else:
        result = value
    elif tok.isdigit() and len(tok) == 1:
      if not stack:
        if result is not None:
          raise ValueError(f'malformed ListOps expression: {source[:80]!r}')
        result = int(tok)
      else:
        stack[-1].append(int(tok))
    else:
      raise ValueError(f'unknown ListOps token {tok!r}')
  if stack or result is None:
    raise ValueError(f'malformed ListOps expression: {source[:80]!r}')
  return result


def tree_value(tree: Tree) -> int:
  if isinstance(tree, int):
    return tree
  op, children = tree
  return apply_op(op, [tree_value(c) for c in children])


def generate(seed: int, num_examples: int, *, max_depth: int = 10, max_args: int = 10,
             min_length: int = 500, max_length: int = 2000) -> Iterator[tuple[str, int]]:
  """Yields `num_examples` distinct (source, label) pairs, reproducible from `seed`."""
  rng = random.Random(seed)
  seen = set()
  while len(seen) < num_examples:
    tree, length = generate_tree(rng, 1, max_depth, max_args)
    if min_length < length < max_length:
      source = to_string(tree)
      if source not in seen:
        seen.add(source)
        yield source, tree_value(tree)
