"""Sequence-length curriculum: short rows first, longer rows later (`train.curriculum`).

Training on short sequences early and on the full length later makes the early steps cheap
(attention is quadratic in the length) and stable; GPT-style warmup of the sequence length (Li,
Zhang and He, "The stability-efficiency dilemma", 2022) and the staged lengths of long-context
recipes are both such schedules.

A curriculum is a list of stages `(start_step, seq_len[, batch_size])`. A stage applies to the
updates whose step counter (`state['step']` before the update, the counter the learning-rate
schedule reads) is at or past its `start_step` and before the next stage's; the metrics logged
at step n (n updates done) belong to the stage of counter n - 1. Without a batch size, a stage
keeps the tokens per step of the full-length batch: batch_size = train.batch_size x
data.seq_len / seq_len. The longest stage is data.seq_len, the length evaluation runs at.

Data: each stage reads its own pipeline, built at the stage's row length and batch size. In
every data shard's shuffled, repeated example stream it starts where the previous stage's
pipeline would read again from (`DataIterator.stream_position`): after every example that
stage used up, at the first example its last row was cut from (concat packing; the first of
the last packing window with first_fit, the next one unpacked). So a curriculum changes the
row length, not which examples are read: at a stage change only the few examples of the last
row are read again. The position saved with a checkpoint is (step, stage, where the stage's
pipeline started, that pipeline's state) per data shard, so a run killed anywhere, on a stage
boundary too, resumes exactly.

Shapes: every stage is a new batch shape, so the jitted train step compiles once per stage
(when the stage starts, or when a run resumes in it), with the same shardings.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxformer.config import fail
from jaxformer.data.pipeline import DataStateError

FIELD = 'train.curriculum'


@dataclasses.dataclass(frozen=True)
class Stage:
  start: int
  seq_len: int
  batch_size: int

  @property
  def tokens(self) -> int:
    """Token positions per step (padding included)."""
    return self.seq_len * self.batch_size


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Stages in order of their start steps; the first starts at step 0."""
  stages: tuple[Stage, ...]

  @classmethod
  def constant(cls, seq_len: int, batch_size: int) -> Curriculum:
    return cls((Stage(0, seq_len, batch_size),))

  @classmethod
  def from_spec(cls, spec: Sequence[Sequence[int]], *, seq_len: int, batch_size: int
                ) -> Curriculum:
    """Validates `train.curriculum` against data.seq_len and train.batch_size (see the module
    docstring); every error names the stage and what is allowed."""
    tokens = batch_size * seq_len
    stages = []
    for i, entry in enumerate(spec):
      field = f'{FIELD}[{i}]'
      if (not isinstance(entry, Sequence) or len(entry) not in (2, 3)
          or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                     for x in entry)):
        fail(field, entry, 'a stage is (start_step, seq_len) or (start_step, seq_len, '
             'batch_size), all integers')
      start, length = int(entry[0]), int(entry[1])
      if i == 0 and start != 0:
        fail(field, entry, 'the first stage must start at step 0')
      if i > 0 and start <= stages[-1].start:
        fail(field, entry, f'starts at step {start}, not after the previous stage (step '
             f'{stages[-1].start}): stages are listed by strictly increasing start step')
      if length <= 0:
        fail(field, entry, 'its seq_len must be a positive integer')
      if length > seq_len:
        fail(field, entry, f'its seq_len {length} exceeds data.seq_len={seq_len}, which is the '
             'longest stage (the length the model is laid out and evaluated for)')
      if len(entry) == 3:
        batch = int(entry[2])
        if batch <= 0:
          fail(field, entry, 'its batch_size must be a positive integer')
      else:
        if tokens % length:
          fail(field, entry, f'a stage without a batch size keeps the tokens per step of '
               f'train.batch_size x data.seq_len = {batch_size} x {seq_len} = {tokens}, which '
               f'seq_len {length} does not divide; pick a seq_len that divides {tokens}, or '
               f'give the batch size: ({start}, {length}, batch_size)')
        batch = tokens // length
      stages.append(Stage(start, length, batch))
    if not stages:
      fail(FIELD, tuple(spec), 'must list at least one stage, or be empty for no curriculum')
    longest = max(s.seq_len for s in stages)
    if longest != seq_len:
      fail(FIELD, tuple(tuple(e) for e in spec),
           f'its longest stage ({longest}) must be data.seq_len={seq_len}, the length the model '
           f'is evaluated at; add a stage (start_step, {seq_len}) or set data.seq_len={longest}')
    return cls(tuple(stages))

  @property
  def starts(self) -> list[int]:
    return [s.start for s in self.stages]

  def index(self, step: int) -> int:
    """The stage of the update that starts at step counter `step` (>= 0)."""
    if step < 0:
      raise ValueError(f'step={step} is invalid: steps count from 0')
    return bisect.bisect_right(self.starts, step) - 1

  def at(self, step: int) -> Stage:
    return self.stages[self.index(step)]

  def tokens_through(self, step: int) -> int:
    """Token positions of the first `step` updates (steps 0 .. step - 1)."""
    ends = self.starts[1:] + [step]
    return sum(s.tokens * max(0, min(end, step) - s.start) for s, end in zip(self.stages, ends))


def _as_spec(stage: Stage) -> list[int]:
  return [stage.start, stage.seq_len, stage.batch_size]


class CurriculumIterator:
  """Global batches of a curriculum, one per step (see the module docstring).

  `open_stage(stage, start_indices)` returns the `jaxformer.data.shards.ShardedIterator` of a
  stage whose shards start at `start_indices` (shard -> stream index). It plugs into the
  checkpointer like a ShardedIterator: `shards`, `num_shards`, `shard_states`,
  `set_shard_states`, `start_prefetch`, `close`.
  """

  def __init__(self, curriculum: Curriculum,
               open_stage: Callable[[Stage, Mapping[int, int] | None], object]):
    self.curriculum = curriculum
    self._open = open_stage
    self.step = 0
    self._stage = 0
    self._current = open_stage(curriculum.stages[0], None)
    self._starts = {j: 0 for j in self._current.shards}
    self.num_shards = self._current.num_shards
    self.tokenizer = self._current.tokenizer
    self.vocab_size = self._current.vocab_size

  @property
  def shards(self):
    return self._current.shards

  @property
  def stage(self) -> Stage:
    """The stage of the batches served last (of the first batch, before any)."""
    return self.curriculum.stages[self._stage]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    k = self.curriculum.index(self.step)
    if k != self._stage:
      starts = {j: it.stream_position() for j, it in self._current.shards.items()}
      self._reopen(k, starts)
    batch = next(self._current)
    self.step += 1
    return batch

  def _reopen(self, k: int, starts: Mapping[int, int]) -> None:
    self._current.close()
    self._stage, self._starts = k, dict(starts)
    self._current = self._open(self.curriculum.stages[k], self._starts)

  def seek(self, step: int) -> None:
    """Serves step `step`'s stage next, from the start of the example stream (for a checkpoint
    saved without a data position)."""
    self._reopen(self.curriculum.index(step), {j: 0 for j in self._starts})
    self.step = step

  def shard_states(self) -> dict[int, bytes]:
    meta = {'step': self.step, 'stage': self._stage, 'stage_spec': _as_spec(self.stage)}
    return {j: json.dumps({'curriculum': dict(meta, start_index=self._starts[j]),
                           'data': json.loads(s)}).encode()
            for j, s in self._current.shard_states().items()}

  def set_shard_states(self, states: Mapping[int, bytes]) -> None:
    parsed = {j: json.loads(states[j]) for j in self._current.shards}
    metas = {j: s.get('curriculum') for j, s in parsed.items()}
    if any(m is None for m in metas.values()):
      raise DataStateError(
          'the data position was saved by a run without a sequence-length curriculum; resume '
          f'it without {FIELD} (or start a new --workdir)')
    first = next(iter(metas.values()))
    if any((m['step'], m['stage']) != (first['step'], first['stage']) for m in metas.values()):
      raise DataStateError(f'the data shards were saved at different steps or stages: {metas}')
    k = first['stage']
    now = _as_spec(self.curriculum.stages[k]) if k < len(self.curriculum.stages) else None
    if now != first['stage_spec'] or self.curriculum.index(first['step'] - 1 if first['step']
                                                           else 0) != k:
      raise DataStateError(
          f'the data position was saved at step {first["step"]} in curriculum stage {k} '
          f'(start_step, seq_len, batch_size) = {tuple(first["stage_spec"])}, but {FIELD} now '
          f'has {"no such stage" if now is None else tuple(now)} there; stages up to the one a '
          'checkpoint is in must stay as they were (later ones may change)')
    starts = {j: m['start_index'] for j, m in metas.items()}
    if (k, starts) != (self._stage, self._starts):
      self._reopen(k, starts)
    self._current.set_shard_states({j: json.dumps(s['data']).encode()
                                    for j, s in parsed.items()})
    self.step = first['step']

  def start_prefetch(self) -> None:
    self._current.start_prefetch()

  def close(self) -> None:
    self._current.close()


def make_curriculum_pipeline(cfg, curriculum: Curriculum, split: str, *, seed: int,
                             process_index: int, process_count: int, tokenizer=None
                             ) -> CurriculumIterator:
  """This process's part of the global batches of every stage of `curriculum` (each stage's
  batch size is global). Every stage's batch is checked against the data shards first, so a
  stage that cannot be loaded fails before training starts, not when it is reached."""
  from jaxformer.data import shards as shards_lib  # pylint: disable=import-outside-toplevel
  num_shards = shards_lib.resolve_num_shards(cfg, process_count)
  for i, stage in enumerate(curriculum.stages):
    shards_lib.check_shards(num_shards, stage.batch_size, process_count,
                            f'{FIELD}[{i}] batch_size')
  holder = {'tokenizer': tokenizer}

  def open_stage(stage: Stage, start_indices):
    it = shards_lib.make_process_pipeline(
        cfg, split, batch_size=stage.batch_size, seq_len=stage.seq_len, seed=seed,
        process_index=process_index, process_count=process_count,
        tokenizer=holder['tokenizer'], start_indices=start_indices)
    holder['tokenizer'] = it.tokenizer  # trained or loaded once (SentencePiece)
    return it

  return CurriculumIterator(curriculum, open_stage)
