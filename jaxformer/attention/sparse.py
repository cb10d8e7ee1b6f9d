"""Sparse attention patterns (CATALOG B1-B5) on the block-sparse engine of blocksparse.py.

Each kind is softmax attention restricted to a pattern P(i, j) on the query / key positions
i, j (d = i - j), intersected with the usual AttentionMask (padding, segments, causal, window):

  local (B1, Mistral / Longformer window):  |d| < w               (one-sided d >= 0 if causal)
  dilated (B2, Longformer):                 |d| < w * r and r | d, dilation r per head
  longformer (B3):                          |d| < w or i < g or j < g  (g global tokens)
  bigbird (B4, Zaheer et al. 2020):         M[i // b, j // b] for a block mask M of window,
                                            global and random blocks (`bigbird_block_mask`)
  sparse_transformer (B5, Child et al. 2019)
    strided:                                |d| <= l or l | d
    fixed:                                  i // l == j // l or j mod l >= l - c

For every query block the kind lists the keys P can allow (a window range, the global keys, the
random blocks, the stride columns), so memory is O(T x keys per block) and no [T, S] array
exists; rows of global queries are computed as g x S. The causal forms are the paper's
autoregressive patterns (the mask adds j <= i). Decoding with the ordinary K/V cache evaluates P
on the cache positions. Patterns read positions as token indices (the default positions); the
relative ones (local, dilated, strided) also accept positions restarting per packed segment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.attention import blocksparse, registry
from jaxformer.attention.mask import AttentionMask
from jaxformer.config import AttentionConfig, fail

_UNSUPPORTED = {
    'bias': 'an additive [T, S] bias is itself an n x n array; use RoPE or no positions',
    'cross': 'the sparsity pattern relates query and key positions of one sequence',
    'weights': 'the attention probabilities would be an n x n array',
    'shaw': "Shaw's value term needs the dense [T, S] probabilities",
}


def _positive(kind: str, opts: dict, name: str, minimum: int = 1) -> int:
  value = opts[name]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    fail(f'model.attention.options.{name}', value,
         f'kind {kind!r} needs an integer >= {minimum}')
  return int(value)


def _ranges(n: int, q: int):
  """(first, last) query index of each block of q rows over n queries."""
  starts = np.arange(0, n, q)
  return zip(starts, np.minimum(starts + q, n) - 1)


class _Sparse(nnx.Module):
  """Shared construction and call; subclasses define `_keys` and `_pattern`."""

  features = frozenset({'causal', 'padding', 'segments', 'decode', 'window', 'dropout',
                        'softcap'})
  subquadratic = True
  kind = ''
  defaults: dict = {}

  def __init__(self, cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype=None, param_dtype=None, rngs: nnx.Rngs | None = None, **unused):
    del num_kv_heads, dtype, param_dtype, rngs, unused  # no parameters
    self.num_heads = num_heads
    self.scale = cfg.scale if cfg.scale is not None else head_dim ** -0.5
    self.logit_softcap = cfg.logit_softcap
    self.dropout_rate = cfg.dropout
    opts = registry.options(cfg, self.defaults)
    self.block_size = _positive(self.kind, opts, 'block_size')
    self._configure(opts)

  def _configure(self, opts: dict) -> None:
    raise NotImplementedError

  def _keys(self, n: int, causal: bool) -> np.ndarray:
    raise NotImplementedError

  def _pattern(self, n: int, causal: bool) -> blocksparse.Pattern:
    raise NotImplementedError

  global_rows = 0

  def _parts(self, n: int, causal: bool) -> dict:
    """Optional engine arguments splitting the pattern (block_pattern, shared, strided)."""
    return {}

  def __call__(self, q, k, v, mask: AttentionMask | None, bias=None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None):
    if bias is not None:
      raise ValueError(f'attention kind {self.kind!r} takes no additive bias: '
                       f'{_UNSUPPORTED["bias"]}')
    if not deterministic and self.dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError('attention dropout is active (deterministic=False, '
                       f'model.attention.dropout={self.dropout_rate}) but no dropout_rng was given')
    mask = AttentionMask() if mask is None else mask
    n, causal = k.shape[1], mask.causal
    return blocksparse.block_sparse_attention(
        q, k, v, mask, block_size=self.block_size, keys=lambda: self._keys(n, causal),
        pattern=self._pattern(n, causal), global_rows=self.global_rows, scale=self.scale,
        **self._parts(n, causal),
        logit_softcap=self.logit_softcap,
        dropout_rate=0.0 if deterministic else self.dropout_rate, dropout_rng=dropout_rng)


# ------------------------------------------------------------------------------ B1 local
@functools.lru_cache(maxsize=64)
def _window_keys(n: int, q: int, window: int, causal: bool, global_tokens: int = 0) -> np.ndarray:
  return blocksparse.pad_rows([
      np.union1d(np.arange(max(0, t0 - window + 1), t1 + 1 if causal else min(n, t1 + window)),
                 np.arange(min(global_tokens, n)))
      for t0, t1 in _ranges(n, q)])


@registry.register('local', unsupported=_UNSUPPORTED)
class LocalAttention(_Sparse):
  """Sliding-window attention (B1): |i - j| < window, one-sided when causal.

  Options: window (128), block_size (64 query rows per block). The window has the semantics of
  `model.attention.window` (AttentionMask); window >= n is full attention.
  """

  kind = 'local'
  defaults = {'window': 128, 'block_size': 64}
  # T = 8 in the generic tests: a window of 3 over blocks of 3 (lengths not block multiples).
  example_options = {'window': 3, 'block_size': 3}

  def _configure(self, opts):
    self.window = _positive(self.kind, opts, 'window')

  def _keys(self, n, causal):
    return _window_keys(n, self.block_size, self.window, causal)

  def _pattern(self, n, causal):
    return lambda i, j: jnp.abs(i - j) < self.window


# ------------------------------------------------------------------------------ B2 dilated
@functools.lru_cache(maxsize=64)
def _offset_keys(n: int, q: int, offsets: tuple[int, ...]) -> np.ndarray:
  offsets = np.asarray(offsets)
  rows = []
  for t0, t1 in _ranges(n, q):
    j = (np.arange(t0, t1 + 1)[:, None] - offsets[None, :]).ravel()
    rows.append(j[(j >= 0) & (j < n)])
  return blocksparse.pad_rows(rows)


@registry.register('dilated', unsupported=_UNSUPPORTED)
class DilatedAttention(_Sparse):
  """Dilated sliding window (B2, Longformer sec. 3.1): keys at i - j = m r, |m| < window.

  Options: window (64 keys per side, counting the query), dilation (2; an int, or a list cycled
  over the heads as in Longformer's per-head dilation), block_size (64). Dilation 1 is `local`.
  """

  kind = 'dilated'
  defaults = {'window': 64, 'dilation': 2, 'block_size': 64}
  # Heads alternate dilation 1 and 2.
  example_options = {'window': 3, 'dilation': (1, 2), 'block_size': 3}

  def _configure(self, opts):
    self.window = _positive(self.kind, opts, 'window')
    dilation = opts['dilation']
    many = isinstance(dilation, Sequence) and not isinstance(dilation, str)
    values = tuple(dilation) if many else (dilation,)
    if not values:
      fail('model.attention.options.dilation', dilation, 'needs at least one dilation')
    self.dilation = tuple(_positive(self.kind, {'dilation': d}, 'dilation') for d in values)

  def _offsets(self, causal: bool) -> tuple[int, ...]:
    m = np.arange(0 if causal else 1 - self.window, self.window)
    return tuple(np.unique(np.concatenate([m * d for d in self.dilation])).tolist())

  def _keys(self, n, causal):
    return _offset_keys(n, self.block_size, self._offsets(causal))

  def _pattern(self, n, causal):
    if len(self.dilation) == 1:
      r = self.dilation[0]
    else:
      r = jnp.asarray([self.dilation[h % len(self.dilation)] for h in range(self.num_heads)])
      r = r[:, None, None]  # [N, 1, 1] against [.., 1, Tq, Sk]

    def pattern(i, j):
      d = i - j
      return (d % r == 0) & (jnp.abs(d) < self.window * r)
    return pattern


# ------------------------------------------------------------------------------ B3 longformer
@registry.register('longformer', unsupported=_UNSUPPORTED)
class LongformerAttention(_Sparse):
  """Longformer (B3, Beltagy et al. 2020): sliding window plus symmetric global tokens.

  The first `global_tokens` positions attend to every key and every query attends to them;
  their rows are computed as g x n. Options: window (128, as in `local`), global_tokens (1),
  block_size (64).
  """

  kind = 'longformer'
  defaults = {'window': 128, 'global_tokens': 1, 'block_size': 64}
  # At T = 8: one global token and a window of 2.
  example_options = {'window': 2, 'global_tokens': 1, 'block_size': 3}

  def _configure(self, opts):
    self.window = _positive(self.kind, opts, 'window')
    self.global_tokens = _positive(self.kind, opts, 'global_tokens', minimum=0)
    self.global_rows = self.global_tokens

  def _keys(self, n, causal):
    return _window_keys(n, self.block_size, self.window, causal, self.global_tokens)

  def _pattern(self, n, causal):
    g = self.global_tokens
    return lambda i, j: (jnp.abs(i - j) < self.window) | (i < g) | (j < g)


# ------------------------------------------------------------------------------ B4 bigbird
def _bigbird_rows(num_blocks: int, window_blocks: int, global_blocks: int, random_blocks: int,
                  seed: int, causal: bool) -> np.ndarray:
  """[nb, nb] key blocks of each query block: window, global columns and random blocks."""
  m = np.zeros((num_blocks, num_blocks), bool)
  for i in range(num_blocks):
    m[i, max(0, i - window_blocks):(i + 1 if causal else i + window_blocks + 1)] = True
    m[i, :global_blocks] = True
    if i < global_blocks:
      continue
    # Candidates depend only on blocks <= i when causal, so a decoding cache of any length
    # sees the same random blocks as the full forward pass.
    candidates = np.flatnonzero(~m[i, :(i if causal else num_blocks)])
    if candidates.size:
      rng = np.random.default_rng((seed, i))
      chosen = rng.choice(candidates, size=min(random_blocks, candidates.size), replace=False)
      m[i, chosen] = True
  return m


@functools.lru_cache(maxsize=64)
def bigbird_block_mask(num_blocks: int, *, window_blocks: int, global_blocks: int,
                       random_blocks: int, seed: int, causal: bool) -> np.ndarray:
  """BigBird's block mask [nb, nb] (True = query block i sees key block j), read-only.

  Query block i sees key blocks i - w .. i + w (i - w .. i when causal), the first
  `global_blocks` blocks, and `random_blocks` others drawn from a generator seeded with
  (seed, i); global query blocks see every block. Causal masks keep j <= i (within the diagonal
  block the element mask adds j <= i).
  """
  m = _bigbird_rows(num_blocks, window_blocks, global_blocks, random_blocks, seed, causal)
  m[:global_blocks] = True
  if causal:
    m &= np.tri(num_blocks, dtype=bool)
  m.flags.writeable = False
  return m


@functools.lru_cache(maxsize=64)
def _block_keys(n: int, q: int, rows: tuple[tuple[int, ...], ...]) -> np.ndarray:
  return blocksparse.pad_rows([
      np.concatenate([np.arange(j * q, min(n, (j + 1) * q)) for j in r]) for r in rows])


@registry.register('bigbird', unsupported=_UNSUPPORTED)
class BigBirdAttention(_Sparse):
  """BigBird ITC (B4, Zaheer et al. 2020): window + global + random blocks of block_size.

  Options: block_size (64), window_blocks (1 neighbour block per side), global_blocks (1, the
  first blocks, symmetric), random_blocks (2 per query block), seed (0; the random blocks are
  fixed for a layer, the same for every layer built from one config). The mask is
  `bigbird_block_mask`; global query blocks are computed densely (global_blocks x block_size
  rows over all keys).
  """

  kind = 'bigbird'
  defaults = {'block_size': 64, 'window_blocks': 1, 'global_blocks': 1, 'random_blocks': 2,
              'seed': 0}
  # 4 blocks of 2 at T = 8: the random block fills the gap between global and window blocks.
  example_options = {'block_size': 2, 'window_blocks': 1, 'global_blocks': 1, 'random_blocks': 1,
                     'seed': 0}

  def _configure(self, opts):
    self.window_blocks = _positive(self.kind, opts, 'window_blocks', minimum=0)
    self.global_blocks = _positive(self.kind, opts, 'global_blocks', minimum=0)
    self.random_blocks = _positive(self.kind, opts, 'random_blocks', minimum=0)
    self.seed = _positive(self.kind, opts, 'seed', minimum=0)
    self.global_rows = self.global_blocks * self.block_size

  def _settings(self, n: int, causal: bool):
    return (-(-n // self.block_size), self.window_blocks, self.global_blocks,
            self.random_blocks, self.seed, causal)

  def block_mask(self, n: int, causal: bool) -> np.ndarray:
    """The block mask this layer uses for n tokens."""
    nb, w, g, r, seed, causal = self._settings(n, causal)
    return bigbird_block_mask(nb, window_blocks=w, global_blocks=g, random_blocks=r, seed=seed,
                              causal=causal)

  def _keys(self, n, causal):
    rows = _bigbird_rows(*self._settings(n, causal))
    return _block_keys(n, self.block_size, tuple(tuple(np.flatnonzero(r).tolist()) for r in rows))

  def _pattern(self, n, causal):
    table = jnp.asarray(self.block_mask(n, causal))
    nb, q = table.shape[0], self.block_size
    return lambda i, j: table[jnp.clip(i // q, 0, nb - 1), jnp.clip(j // q, 0, nb - 1)]


# ------------------------------------------------------------------------------ B5 sparse
@functools.lru_cache(maxsize=64)
def _summary_columns(n: int, stride: int, summary: int) -> np.ndarray:
  columns = (np.arange(0, n, stride)[:, None] + np.arange(stride - summary, stride)[None]).ravel()
  columns = columns[columns < n].astype(np.int32)
  columns.flags.writeable = False
  return columns


@functools.lru_cache(maxsize=64)
def _fixed_keys(n: int, q: int, stride: int, causal: bool) -> np.ndarray:
  return blocksparse.pad_rows([
      np.arange(t0 // stride * stride, t1 + 1 if causal else min(n, (t1 // stride + 1) * stride))
      for t0, t1 in _ranges(n, q)])


@registry.register('sparse_transformer', unsupported=_UNSUPPORTED)
class SparseTransformerAttention(_Sparse):
  """Sparse Transformer factorized patterns (B5, Child et al. 2019, sec. 4.2), merged heads.

  strided: A1 = {j : |i - j| <= l}, A2 = {j : (i - j) mod l = 0}; fixed: A1 = {j : j // l =
  i // l}, A2 = {j : j mod l in [l - c, l)}; a query sees A1 u A2 (j <= i when causal; the
  bidirectional forms drop that). Options: pattern ('strided'), stride l (128), summary c (8,
  fixed only), block_size (64 query rows). A2 is computed apart from the blocks: strided per
  residue class mod l ([n / l, n / l] per class), fixed as c n / l columns shared by all rows.
  For a fixed l the pattern has about n^2 / l entries; the paper takes l ~ sqrt(n) (set
  `stride` accordingly, e.g. 64 at n = 4096), which makes memory O(n sqrt(n)).
  """

  kind = 'sparse_transformer'
  defaults = {'pattern': 'strided', 'stride': 128, 'summary': 8, 'block_size': 64}
  # At T = 8: a stride of 3, so both the local and the strided component are exercised.
  example_options = {'pattern': 'strided', 'stride': 3, 'summary': 2, 'block_size': 3}

  def _configure(self, opts):
    if opts['pattern'] not in ('strided', 'fixed'):
      fail('model.attention.options.pattern', opts['pattern'],
           "allowed values are ['fixed', 'strided']")
    self.pattern = opts['pattern']
    self.stride = _positive(self.kind, opts, 'stride')
    self.summary = _positive(self.kind, opts, 'summary')
    if self.pattern == 'fixed' and self.summary > self.stride:
      fail('model.attention.options.summary', self.summary,
           f'must be at most stride={self.stride} for the fixed pattern')

  def _keys(self, n, causal):
    if self.pattern == 'strided':  # A1: |i - j| <= l
      return _window_keys(n, self.block_size, self.stride + 1, causal)
    return _fixed_keys(n, self.block_size, self.stride, causal)  # A1: the l-block of i

  def _pattern(self, n, causal):
    l, c = self.stride, self.summary
    if self.pattern == 'strided':
      return lambda i, j: (jnp.abs(i - j) <= l) | ((i - j) % l == 0)
    return lambda i, j: (i // l == j // l) | (j % l >= l - c)

  def _parts(self, n, causal):
    # A2 runs as its own pass over disjoint keys: per residue class (strided) or as columns
    # shared by every query (fixed), so no query block gathers n / l columns of its own.
    l, c = self.stride, self.summary
    if self.pattern == 'strided':
      return {'block_pattern': lambda i, j: jnp.abs(i - j) <= l,
              'strided': (l, lambda i, j: ((i - j) % l == 0) & (jnp.abs(i - j) > l))}
    summary = lambda i, j: j % l >= l - c
    return {'block_pattern': lambda i, j: (i // l == j // l) & ~summary(i, j),
            'shared': (_summary_columns(n, l, c), summary)}
