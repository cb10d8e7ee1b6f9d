"""Data shards: what a global batch is made of, whatever the number of processes.

A split is read as `data.num_shards` disjoint shards (`source[j::S]`, each with its own
shuffling, packing and iterator state). A global batch of B rows is the concatenation of B / S
rows from every shard, in shard order. Process i of n loads only its shards
j in [i S / n, (i + 1) S / n): together the processes hold exactly the rows of the global batch,
in the order the batch axes of the mesh give them (process 0's devices hold the first rows).

So the batches of a run depend on `data.num_shards`, not on how many processes load them: a job
of two processes sees the batches of one process with `data.num_shards=2`, and a checkpoint's
data position (one state per shard) resumes with any process count that divides the shard
count. `data.num_shards=0` (default) means one shard per process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from jaxformer.config import ConfigError
from jaxformer.data.config import DataConfig
from jaxformer.data.pipeline import DataIterator, make_pipeline


def resolve_num_shards(cfg: DataConfig, process_count: int) -> int:
  return cfg.num_shards or process_count


def check_shards(num_shards: int, batch_size: int, process_count: int,
                 batch_field: str = 'train.batch_size') -> None:
  """Raises ConfigError unless the shards split over the processes and the batch over them."""
  if num_shards % process_count:
    raise ConfigError(f'data.num_shards={num_shards} is invalid: it must be a multiple of the '
                      f'number of processes ({process_count}), each process loading whole shards')
  if batch_size % num_shards:
    raise ConfigError(f'{batch_field}={batch_size} is invalid: a batch takes the same number '
                      f'of rows from each of the {num_shards} data shards (data.num_shards), so '
                      f'it must be a multiple of {num_shards}')


class ShardedIterator:
  """The rows of a process's shards of every global batch (see the module docstring)."""

  def __init__(self, shards: Mapping[int, DataIterator], num_shards: int):
    self.shards = dict(sorted(shards.items()))
    self.num_shards = num_shards
    first = next(iter(self.shards.values()))
    self.tokenizer = first.tokenizer
    self.vocab_size = first.vocab_size

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.shards.values()]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def shard_states(self) -> dict[int, bytes]:
    return {j: it.get_state() for j, it in self.shards.items()}

  def set_shard_states(self, states: Mapping[int, bytes]) -> None:
    for j, it in self.shards.items():
      it.set_state(states[j])

  def get_state(self) -> bytes:
    return json.dumps({'num_shards': self.num_shards, 'shards': {
        str(j): json.loads(s) for j, s in self.shard_states().items()}}).encode()

  def set_state(self, state: bytes | str) -> None:
    state = json.loads(state)
    if state.get('num_shards') != self.num_shards:
      raise ValueError(f'the data state has {state.get("num_shards")} shards, this pipeline '
                       f'{self.num_shards}')
    self.set_shard_states({j: json.dumps(state['shards'][str(j)]).encode() for j in self.shards})

  def start_prefetch(self) -> None:
    for it in self.shards.values():
      it.start_prefetch()

  def close(self) -> None:
    for it in self.shards.values():
      it.close()


def make_process_pipeline(cfg: DataConfig, split: str, *, batch_size: int, seed: int,
                          process_index: int, process_count: int, tokenizer=None,
                          shuffle: bool = True, num_epochs: int | None = None,
                          seq_len: int | None = None,
                          start_indices: Mapping[int, int] | None = None,
                          batch_field: str = 'train.batch_size') -> ShardedIterator:
  """This process's part of the global batches of `split` (`batch_size` is the global size).

  `seq_len` overrides `cfg.seq_len`; `start_indices` maps a shard to where it starts in its
  example stream (a curriculum stage, `jaxformer.data.curriculum`); `batch_field` names the
  setting a batch size that does not split over the shards came from."""
  num_shards = resolve_num_shards(cfg, process_count)
  check_shards(num_shards, batch_size, process_count, batch_field)
  per = num_shards // process_count
  shards = {}
  for j in range(process_index * per, (process_index + 1) * per):
    shards[j] = make_pipeline(cfg, split, batch_size=batch_size // num_shards, seed=seed,
                              seq_len=seq_len, shard_index=j, shard_count=num_shards,
                              tokenizer=tokenizer, shuffle=shuffle, num_epochs=num_epochs,
                              start_index=(start_indices or {}).get(j, 0))
    tokenizer = shards[j].tokenizer
  return ShardedIterator(shards, num_shards)
