"""Unstructured pruning while training (CATALOG H): magnitude and SNIP, one-shot or gradual.

Eligible parameters are the matrices by their logical names (`jaxformer.finetune.lora.matrices`:
two or more axes besides the stacked 'layers' / 'expert' axes, no 'norm' axis, not a bias); the
embedding tables (and a tied output matrix) only with `compress.prune.embeddings`. A pruning
event at step t keeps, for a target sparsity s,

  magnitude   the weights of largest |w|                  (Han et al. 2015)
  snip        the weights of largest |g * w|, g the loss gradient on the step's batch
              (Lee et al. 2019, "connection sensitivity"; at initialisation when start = 0)

and zeroes the round(s * n) others, exactly: scores are ranked by a stable sort, so ties go by
index (the lower flat index is pruned first). `scope` 'global' ranks every eligible weight of
the model together (n = all of them); 'layer' ranks each matrix, and each layer (or expert)
slice of a stacked matrix, on its own (n = the slice's size, every slice losing the same
count). Weights pruned before score -1, below every live weight, so a mask only ever loses
entries.

Schedules: 'one_shot' prunes to s_f once, at step `start`; 'gradual' follows Zhu & Gupta
(2017, eq. 1)

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt}

with t0 = start, dt = every, t0 + n dt = end. The counts round(s_t * n) are computed on the
host once, so the sparsity after each event is exactly the schedule's.

In the train step (jaxformer/train/step.py): at an event (the step whose input state has
step == t) the masks are recomputed and applied before the forward pass; gradients and optimizer
updates are multiplied by the masks, so a pruned weight stays exactly 0 (neither Adam's
momentum nor decoupled weight decay moves a weight whose update is masked, and decay of 0 is
0). The masks are the state entry 'prune_masks' (checkpointed), a nested dict of bool arrays
laid out like their parameters. The parameters themselves hold the zeros, so evaluation,
export and generation need no masks.

Global ranking sorts all eligible weights at once (an O(N log N) sort of N floats on the
devices, at events only): fine for the models this framework trains on CPUs and single hosts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxformer.compress.config import PruneConfig
from jaxformer.config import ConfigError
from jaxformer.finetune import lora
from jaxformer.train.optimizer import param_role


# -------------------------------------------------------------------- which weights
def eligible(params: nnx.State, embeddings: bool = False) -> dict[tuple, tuple[int, ...]]:
  """{path (tuple of str): batch axes} of the prunable matrices of `params`."""
  flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(params)}
  mats = lora.matrices({'.'.join(p): v for p, v in flat.items()})
  out = {}
  for path, v in flat.items():
    axes = mats.get('.'.join(path))
    if axes is None:
      continue
    if not embeddings and param_role(v, '.'.join(path)).embedding:
      continue
    out[path] = axes[0]
  return out


def schedule(cfg: PruneConfig) -> tuple[np.ndarray, np.ndarray]:
  """(event steps, target sparsity at each) of `cfg`'s schedule."""
  if cfg.schedule == 'one_shot':
    return np.asarray([cfg.start]), np.asarray([cfg.sparsity])
  steps = np.arange(cfg.start, cfg.end + 1, cfg.every)
  frac = (steps - cfg.start) / (cfg.end - cfg.start)
  s = cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - frac) ** 3
  return steps, s


def count(sparsity: float, n: int) -> int:
  """How many of n weights a sparsity prunes: round(s * n), halves up."""
  return int(math.floor(sparsity * n + 0.5))


def keep_top(scores: jax.Array, k) -> jax.Array:
  """scores [G, n] -> bool [G, n], False for the k lowest of each row (ties: lower index
  first), exactly k per row."""
  order = jnp.argsort(scores, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  return ranks >= k


# -------------------------------------------------------------------- nested dicts by path
def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def map_masked(fn, tree: nnx.State, masks: dict) -> nnx.State:
  """fn(value, mask) on every pruned parameter of `tree` (parameters, gradients, updates: an
  nnx.State laid out like the parameters); the others unchanged."""
  out = []
  for path, v in nnx.to_flat_state(tree):
    key = tuple(map(str, path))
    try:
      m = _get(masks, key)
    except (KeyError, TypeError):
      out.append((path, v))
      continue
    out.append((path, v.replace(fn(v.get_value(), m))))
  return nnx.from_flat_state(out)


def apply_masks(tree: nnx.State, masks: dict) -> nnx.State:
  """`tree` with the pruned entries set to exactly 0."""
  return map_masked(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, masks)


# -------------------------------------------------------------------- the pruner
class Pruner:
  """`compress.prune` over a model's parameters (abstract or not): see the module docstring."""

  def __init__(self, cfg: PruneConfig, params: nnx.State):
    self.cfg = cfg
    self.targets = eligible(params, cfg.embeddings)
    if not self.targets:
      raise ConfigError(f'compress.prune.method={cfg.method!r} is invalid for this model: it has '
                        'no prunable matrix (with compress.prune.embeddings='
                        f'{cfg.embeddings})')
    flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(params)}
    self.shapes = {p: tuple(flat[p].get_value().shape) for p in self.targets}
    self.templates = {p: flat[p] for p in self.targets}
    self.steps, self.sparsities = schedule(cfg)
    total = sum(math.prod(s) for s in self.shapes.values())
    if cfg.scope == 'global':
      self.counts = {None: np.asarray([count(s, total) for s in self.sparsities], np.int32)}
    else:
      self.counts = {p: np.asarray([count(s, self._row(p)) for s in self.sparsities], np.int32)
                     for p in self.targets}

  def _rows(self, path) -> int:
    shape = self.shapes[path]
    return math.prod(shape[i] for i in self.targets[path])

  def _row(self, path) -> int:
    return math.prod(self.shapes[path]) // self._rows(path)

  def size(self) -> int:
    """How many weights are eligible."""
    return sum(math.prod(s) for s in self.shapes.values())

  def expected_zeros(self, step: int) -> int:
    """How many eligible weights are pruned once the events up to `step` have run."""
    done = np.nonzero(self.steps <= step)[0]
    if not len(done):
      return 0
    j = done[-1]
    if self.cfg.scope == 'global':
      return int(self.counts[None][j])
    return sum(int(c[j]) * self._rows(p) for p, c in self.counts.items())

  # ---------------------------------------------------------------- state entry
  def init_masks(self) -> dict:
    """Every weight kept: {nested path: bool array like the parameter}."""
    return traverse_util.unflatten_dict(
        {p: jnp.ones(s, jnp.bool_) for p, s in self.shapes.items()})

  def shardings(self, layout) -> dict:
    """The masks' shardings: each like its parameter."""
    return traverse_util.unflatten_dict({
        p: layout.variable_sharding(v, f'the pruning mask of {".".join(p)!r}')
        for p, v in self.templates.items()})

  # ---------------------------------------------------------------- events
  def scores(self, params: nnx.State, masks: dict, grads: nnx.State | None = None
             ) -> dict[tuple, jax.Array]:
    """{path: float32 score}: |w| (magnitude) or |g * w| (snip); -1 where already pruned."""
    flat = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    gflat = None if grads is None else {
        tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}
    out = {}
    for p in self.targets:
      w = flat[p].astype(jnp.float32)
      s = jnp.abs(w) if gflat is None else jnp.abs(gflat[p].astype(jnp.float32) * w)
      out[p] = jnp.where(_get(masks, p), s, -1.0)
    return out

  def new_masks(self, scores: dict[tuple, jax.Array], j) -> dict:
    """The masks of event `j` (an index into the schedule, may be traced) from `scores`."""
    paths = list(self.targets)
    if self.cfg.scope == 'global':
      k = jnp.asarray(self.counts[None])[j]
      keep = keep_top(jnp.concatenate([scores[p].reshape(-1) for p in paths])[None], k)[0]
      sizes = np.cumsum([0] + [math.prod(self.shapes[p]) for p in paths])
      return traverse_util.unflatten_dict({
          p: keep[sizes[i]:sizes[i + 1]].reshape(self.shapes[p])
          for i, p in enumerate(paths)})
    out = {}
    for p in paths:
      batch = self.targets[p]
      x = scores[p]
      # The batch axes lead (matrix_axes reads them first), so rows are slices.
      rows = x.reshape((self._rows(p), -1)) if batch else x.reshape((1, -1))
      k = jnp.asarray(self.counts[p])[j]
      out[p] = keep_top(rows, k).reshape(self.shapes[p])
    return traverse_util.unflatten_dict(out)

  def event(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(whether `step` prunes, the index of its event)."""
    hit = jnp.asarray(self.steps, jnp.int32) == step
    return jnp.any(hit), jnp.argmax(hit)

  def maybe_prune(self, params: nnx.State, masks: dict, step: jax.Array, grad_fn=None):
    """(params, masks) after the event at `step`, if there is one (lax.cond: the ranking runs
    only at events). `grad_fn(params)` -> the loss gradient, for SNIP."""
    is_event, j = self.event(step)

    def prune(params, masks):
      grads = grad_fn(params) if self.cfg.method == 'snip' else None
      masks = self.new_masks(self.scores(params, masks, grads), j)
      return apply_masks(params, masks), masks

    return jax.lax.cond(is_event, prune, lambda p, m: (p, m), params, masks)


def prune_once(params: nnx.State, cfg: PruneConfig) -> nnx.State:
  """Magnitude pruning of trained parameters to `cfg.sparsity` (post-training, one-shot)."""
  pruner = Pruner(cfg, params)
  masks = pruner.new_masks(pruner.scores(params, pruner.init_masks()), 0)
  return apply_masks(params, masks)


def sparsity_report(params: nnx.State, embeddings: bool = False) -> dict[str, float]:
  """Zeros among the eligible matrices, and the bytes of the parameters stored dense and with
  the eligible matrices as a bitmap (one bit per weight) plus their nonzero values."""
  targets = eligible(params, embeddings)
  dense = zeros = n = sparse = 0
  for path, v in nnx.to_flat_state(params):
    x = np.asarray(v.get_value())
    dense += x.nbytes
    if tuple(map(str, path)) in targets:
      nz = int(np.count_nonzero(x))
      zeros += x.size - nz
      n += x.size
      sparse += nz * x.itemsize + (x.size + 7) // 8
    else:
      sparse += x.nbytes
  return {'eligible': n, 'zeros': zeros, 'sparsity': zeros / max(n, 1), 'dense_bytes': dense,
          'bitmap_bytes': sparse}
