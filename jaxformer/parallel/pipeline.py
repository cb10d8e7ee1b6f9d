"""Pipeline parallelism over the 'stage' mesh axis: GPipe and circular schedules (CATALOG J).

The scanned layer stack (models/stack.py) of G layer groups is cut into S stages of G / S groups
(GPipe, Huang et al. 2019), or, with R = `parallel.pipeline.repeats` > 1, into R * S chunks of
G / (R S) groups that go round the stages R times (the circular or interleaved schedule of
Narayanan et al. 2021): chunk c = r * S + s runs on stage s. The batch is cut into M micro-batches,
and M is `optim.grad_accum_steps`: pipeline micro-batches and gradient accumulation are one
concept (without a pipeline the micro-batches run one after the other; with one they overlap).

Every stage runs at every iteration t (one program, SPMD): the stages are a `jax.vmap` over a
leading stage dimension, which the layout shards over 'stage' (`spmd_axis_name`), in the style
of MaxText. Stage s at iteration t works on task k = t - s (micro-batch m = k mod M, repeat
r = k div M) when 0 <= k < R M, and idles otherwise. After each iteration the stage outputs move
one stage on (`jnp.roll` over the sharded stage dimension: a collective permute). Stage 0 takes
micro-batch m fresh from the input in repeat 0 and from the last stage's output in later
repeats, which the last stage wrote into a buffer of M slots; that output is ready in time when
M >= S, so circular schedules need M >= S. The run takes R M + S - 1 iterations, of which
S - 1 per stage idle: the bubble is (S - 1) / (R M + S - 1).

The carried state holds the task id of what each stage is working on, next to its activations,
so the schedule that ran is recorded as it runs (`run` returns it as a trace [iterations, S]);
experiments/pipeline_bubble.py counts the bubble from that trace.

Gradients are those of the whole loop (the backward pass is the reversed pipeline); `remat`
applies to each layer group inside the stages. Per-micro-batch side inputs (segment ids,
positions, an encoder output) travel with the task: each stage reads those of its micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.config import fail


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """S stages, M micro-batches, R repeats (R = 1: GPipe; R > 1: circular)."""
  stages: int
  microbatches: int
  repeats: int = 1

  def __post_init__(self):
    for field in ('stages', 'microbatches', 'repeats'):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'PipelineSpec.{field}={value!r} must be a positive integer')
    if self.repeats > 1 and self.microbatches < self.stages:
      raise ValueError(f'a circular schedule (repeats={self.repeats}) needs at least as many '
                       f'micro-batches ({self.microbatches}) as stages ({self.stages})')

  @property
  def iterations(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """The fraction of stage-iterations that idle: (S - 1) / (R M + S - 1)."""
    return (self.stages - 1) / self.iterations

  def chunk_groups(self, num_groups: int) -> int:
    """Layer groups per chunk (G / (R S)); G must divide."""
    chunks = self.stages * self.repeats
    if num_groups % chunks:
      raise ValueError(f'{num_groups} layer groups do not split into {self.stages} stages x '
                       f'{self.repeats} repeats')
    return num_groups // chunks


def planned_trace(spec: PipelineSpec):
  """The schedule as planned, [iterations, S] task ids (-1: idle), for pictures and checks."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  t = np.arange(spec.iterations)[:, None]
  k = t - np.arange(spec.stages)[None, :]
  return np.where((k >= 0) & (k < spec.repeats * spec.microbatches), k, -1)


def to_stages(a: jax.Array, spec: PipelineSpec) -> jax.Array:
  """Stacked layer groups [G, ...] -> [S, R, G / (R S), ...]: chunk r * S + s at [s, r]."""
  per = spec.chunk_groups(a.shape[0])
  a = a.reshape((spec.repeats, spec.stages, per) + a.shape[1:])
  return jnp.swapaxes(a, 0, 1)


def run(stage_fn: Callable, weights: Any, x: jax.Array, side: Any, spec: PipelineSpec, *,
        stage_axis: str | None = None, constrain_state: Callable | None = None):
  """Runs the schedule; -> (outputs [M, ...], aux summed over the tasks, trace [iters, S]).

  stage_fn(w, x, side, m) -> (y, aux): one stage's chunk on one micro-batch; `w` is the
    stage's weights for the current repeat (leaves of `weights` without their [S, R] dims),
    `x` and `y` one micro-batch [mb, ...], `side` that micro-batch's side inputs, `m` its index
    (a traced int32, e.g. for dropout keys); aux a pytree of scalars.
  weights: pytree of [S, R, ...] arrays (`to_stages`).
  x: the micro-batches [M, mb, ...]; side: pytree of [M, ...] arrays.
  stage_axis: the mesh axis the stage dimension is sharded over (vmap's `spmd_axis_name`).
  constrain_state: applied to the carried stage activations [S, mb, ...] (a sharding
    constraint), if given.
  """
  s_, m_, r_ = spec.stages, spec.microbatches, spec.repeats
  if x.shape[0] != m_:
    raise ValueError(f'x has {x.shape[0]} micro-batches, the schedule {m_}')
  constrain_state = constrain_state or (lambda a: a)

  def one_stage(w, r, xs, sd, m):
    w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False), w)
    return stage_fn(w, xs, sd, m)

  stages = jax.vmap(one_stage, spmd_axis_name=stage_axis)
  aux_shape = jax.eval_shape(
      lambda: stage_fn(jax.tree.map(lambda a: a[0, 0], weights), x[0],
                       jax.tree.map(lambda a: a[0], side), jnp.int32(0))[1])
  aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)

  def iteration(carry, t):
    state, ids, buffer, aux_sum = carry
    # Stage 0 takes task t: micro-batch t mod M, fresh in repeat 0, else back from the buffer.
    m0 = t % m_
    first = jax.lax.dynamic_index_in_dim(x, m0, 0, keepdims=False)
    again = jax.lax.dynamic_index_in_dim(buffer, m0, 0, keepdims=False)
    state = state.at[0].set(jnp.where(t < m_, first, again))
    ids = ids.at[0].set(jnp.where(t < r_ * m_, t, -1))
    state = constrain_state(state)
    busy = ids >= 0
    m = jnp.where(busy, ids % m_, 0)
    r = jnp.where(busy, ids // m_, 0)
    sd = jax.tree.map(lambda a: jnp.take(a, m, axis=0), side)
    y, aux = stages(weights, r, state, sd, m)
    aux_sum = jax.tree.map(
        lambda acc, a: acc + jnp.sum(jnp.where(busy, a, jnp.zeros_like(a)), axis=0), aux_sum, aux)
    # The last stage's finished task goes to its micro-batch's slot of the buffer.
    last, m_last = busy[-1], m[-1]
    old = jax.lax.dynamic_index_in_dim(buffer, m_last, 0, keepdims=False)
    buffer = jax.lax.dynamic_update_index_in_dim(
        buffer, jnp.where(last, y[-1], old), m_last, 0)
    state = constrain_state(jnp.roll(y, 1, axis=0))
    return (state, jnp.roll(ids, 1), buffer, aux_sum), ids

  state0 = constrain_state(jnp.zeros((s_,) + x.shape[1:], x.dtype))
  ids0 = jnp.full((s_,), -1, jnp.int32)
  carry = (state0, ids0, jnp.zeros_like(x), aux0)
  (_, _, out, aux_sum), trace = jax.lax.scan(iteration, carry,
                                              jnp.arange(spec.iterations, dtype=jnp.int32))
  return out, aux_sum, trace


def idle_fraction(trace) -> float:
  """The fraction of stage-iterations in a trace that did no work."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  trace = np.asarray(trace)
  return float(np.mean(trace < 0))


def check_config(*, stages: int, repeats: int, microbatches: int, num_layers: dict[str, int],
                 period: int, family: str, own_layers: str | None, reversible: bool,
                 scan_layers: bool) -> None:
  """Config-time refusals for pipeline parallelism (S = parallel.mesh.stage > 1).

  `num_layers` maps the config field that sets each pipelined stack's depth to its value;
  `period` is the number of layers in a scanned group (`models.stack.layer_period`: the MoE
  and hybrid-attention periods).
  `own_layers` is the family's reason for not running the shared stack, if it does not
  (`models/registry.py`).
  """
  if repeats < 1:
    fail('parallel.pipeline.repeats', repeats, 'must be a positive integer')
  if stages == 1:
    if repeats > 1:
      fail('parallel.pipeline.repeats', repeats,
           'needs pipeline parallelism (parallel.mesh.stage > 1); with one stage there is '
           'nothing to repeat')
    return
  if own_layers is not None:
    fail('parallel.mesh.stage', stages,
         f'asks for pipeline parallelism, which model.family={family!r} cannot use: '
         f'{own_layers}; set parallel.mesh.stage=1')
  if reversible:
    fail('parallel.mesh.stage', stages,
         'cannot pipeline reversible layers (model.reversible=True): their backward pass '
         'recomputes activations layer by layer instead of storing them, outside the pipeline '
         'schedule; set model.reversible=False or parallel.mesh.stage=1')
  if not scan_layers:
    fail('model.scan_layers', scan_layers,
         f'must be True with parallel.mesh.stage={stages}: the pipeline runs the scanned '
         'layer stack, cut into stages')
  for field, layers in num_layers.items():
    if (layers // period) % (stages * repeats):
      groups = f' groups of {period} layers' if period > 1 else ' layers'
      fail(field, layers, f'({layers // period}{groups}) must be divisible by '
           f'parallel.mesh.stage={stages} x parallel.pipeline.repeats={repeats}, so that every '
           'stage holds as many layers')
  if repeats > 1 and microbatches < stages:
    fail('optim.grad_accum_steps', microbatches,
         f'is the number of pipeline micro-batches and must be >= parallel.mesh.stage={stages} '
         f'for a circular schedule (parallel.pipeline.repeats={repeats}): a micro-batch comes '
         'back to stage 0 for its next repeat S iterations after it left, and stage 0 must '
         'have other micro-batches to work on meanwhile')


