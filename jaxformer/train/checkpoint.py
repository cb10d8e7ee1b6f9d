"""Checkpoints: Orbax `CheckpointManager` with corruption fallback, shape checks and preemption.

Layout: `<workdir>/checkpoints/<step>/{state, extras, data}`. `state` is the train-state pytree
(`ocp.args.StandardSave`: every process writes its own shards, so a sharded state is never
gathered); `extras` is one JSON object (step, RNG, config hash, metrics; `ocp.args.JsonSave`,
written by process 0); `data` holds one data-iterator state per data shard
(`shard_<j>-of-<S>.json`, each written by the process that loads it; see
`jaxformer.data.shards`). All items of a step commit together: Orbax
writes the step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every
item is written (on object stores, where rename is not atomic, a `commit_success.txt` marks the
commit instead). A step directory is therefore complete or absent; a save killed half-way
leaves only a tmp directory that is never listed as a step and is removed on the next start.

Guarantees on top of Orbax:
  * a non-finite state (NaN/Inf) is refused before it can replace a good checkpoint
    (`assert_finite`);
  * `restore` compares the checkpoint's metadata tree with the target abstract state before
    reading any array, and refuses an incompatible checkpoint naming the first mismatching
    parameter path and both shapes (`IncompatibleCheckpointError`);
  * restoring onto another mesh or device count is a matter of the target: the abstract state
    carries the new shardings and Orbax reads each device's part of every array;
  * the data position restores with any number of processes that divides the shard count; a
    checkpoint whose data was cut into another number of shards is refused (`DataStateError`,
    naming both counts and the setting that resumes it) before anything is read;
  * an unreadable latest checkpoint (truncated or missing files, garbled metadata) is reported
    with a warning naming the step and the error, moved aside to `<workdir>/checkpoints_corrupt`
    (by process 0, followed by a barrier), and the previous good step is used; if checkpoints
    exist but none can be read, `restore` raises `CheckpointError` rather than letting training
    restart from scratch. With several processes the step to use is agreed on by all of them;
  * `PreemptionHandler` turns SIGTERM/SIGINT into a flag the train loop polls, so it can save,
    wait for the write to finish, and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxformer.data.pipeline import DataStateError
from jaxformer.parallel import distributed
from jaxformer.parallel.sharding import path_str

log = logging.getLogger(__name__)

STATE = 'state'
EXTRAS = 'extras'
DATA = 'data'
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class IncompatibleCheckpointError(ValueError):
  """The checkpoint's tree or shapes differ from the state it should be restored into."""


class CorruptCheckpointError(CheckpointError):
  """A restored array does not match the checksum saved with it."""


class NonFiniteError(FloatingPointError):
  """A state holds NaN or Inf and must not be written over a good checkpoint."""


def flatten(tree) -> dict[str, Any]:
  """Leaves keyed by `path_str`, in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(path): leaf for path, leaf in leaves}


def _is_inexact(leaf) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None:
    return isinstance(leaf, float)
  return not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and jnp.issubdtype(
      dtype, jnp.inexact)


@jax.jit
def _finite_flags(leaves):
  return [jnp.isfinite(x).all() for x in leaves]


def assert_finite(tree, what: str = 'state') -> None:
  """Raises `NonFiniteError` naming the first leaf of `tree` that holds a NaN or Inf.

  Only floating and complex leaves are checked (integer counters and PRNG keys cannot be
  non-finite); all checks run in one jitted call with a single device-to-host transfer.
  """
  named = [(name, leaf) for name, leaf in flatten(tree).items() if _is_inexact(leaf)]
  if not named:
    return
  flags = jax.device_get(_finite_flags([jnp.asarray(leaf) for _, leaf in named]))
  bad = [name for (name, _), ok in zip(named, flags) if not ok]
  if bad:
    raise NonFiniteError(
        f'{what} has NaN/Inf values in {len(bad)} of {len(named)} arrays, first at '
        f'{bad[0]!r}; refusing to save it over a good checkpoint')


_GOLDEN = 0x9E3779B1  # odd, so weight * delta != 0 (mod 2^32) for every nonzero delta


def _raw_bits(x) -> jax.Array:
  """The bits of every element as uint32, in x's shape (PRNG keys as their key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=2)
def _block_fingerprint(x, offsets, global_shape):
  """sum_i bits_i * (i * _GOLDEN + 1) mod 2^32 over one block of an array, where i is the
  element's flat index in the whole array: the block starts at `offsets` of `global_shape`."""
  bits = _raw_bits(x)
  flat, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for d in reversed(range(bits.ndim)):
    index = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) + offsets[d]
    flat, stride = flat + index * jnp.uint32(stride % 2**32), stride * global_shape[d]
  return jnp.sum(bits * (flat * jnp.uint32(_GOLDEN) + jnp.uint32(1)), dtype=jnp.uint32)


def _fingerprint_parts(leaf) -> list[jax.Array]:
  """This process's share of `leaf`'s checksum: one single-device reduction per shard it
  holds (replicas counted once), so no collective runs. Many small collective programs in
  flight at once can deadlock XLA:CPU's simulated devices (seen: an all-gather rendezvous
  timed out while restoring onto 8 devices)."""
  leaf = jnp.asarray(leaf)
  extra = ()
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    extra = jax.eval_shape(jax.random.key_data, leaf).shape[leaf.ndim:]
  global_shape = tuple(leaf.shape) + tuple(extra)
  parts = []
  for shard in leaf.addressable_shards:
    if shard.replica_id != 0:
      continue
    start = [0 if sl.start is None else sl.start for sl in shard.index] + [0] * len(extra)
    parts.append(_block_fingerprint(shard.data, np.asarray(start, np.uint32), global_shape))
  return parts


def fingerprints(tree) -> dict[str, int]:
  """A 32-bit checksum of every array of `tree`, keyed by path.

  sum_i bits_i * (i * 0x9E3779B1 + 1) mod 2^32 over the raw bits of the array in index order:
  integer sums are exact in any order, so the checksum does not depend on how the array is
  sharded (a checkpoint restored onto another mesh checks out), and since every weight is odd
  any change of one element changes it. Each shard is summed where it lives; the partial sums
  of all processes are added on the host.
  """
  named = [(name, leaf) for name, leaf in flatten(tree).items() if hasattr(leaf, 'dtype')]
  parts = [_fingerprint_parts(leaf) for _, leaf in named]
  sums = np.array([sum(int(v) for v in values) % 2**32
                   for values in jax.device_get(parts)], np.int64)
  if jax.process_count() > 1:  # every process holds only its own shards' partial sums
    sums = distributed.process_sum(sums.astype(np.uint32)) % 2**32
  return {name: int(v) for (name, _), v in zip(named, sums)}


def verify_fingerprints(tree, saved: Mapping[str, int], where: str) -> None:
  """Raises `CorruptCheckpointError` naming the first array whose checksum differs."""
  got = fingerprints(tree)
  bad = [name for name, value in saved.items() if got.get(name) != value]
  if bad:
    raise CorruptCheckpointError(
        f'{where}: {len(bad)} restored array(s) do not match the checksums saved with them, '
        f'first {bad[0]!r} (the files changed after they were written)')


def _shape(leaf) -> tuple[int, ...]:
  """The stored shape: typed PRNG keys are saved as their key data (e.g. threefry adds (2,))."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else np.shape(leaf)


def check_compatible(checkpoint_tree, target_tree, *, where: str = 'checkpoint') -> None:
  """Raises `IncompatibleCheckpointError` unless both trees have the same paths and shapes.

  `checkpoint_tree` is the Orbax metadata tree (leaves carry `.shape`), `target_tree` the
  abstract state to restore into. The message names the first mismatching path and both
  shapes, and how many other paths mismatch. Dtypes may differ: Orbax casts on restore.
  """
  saved, wanted = flatten(checkpoint_tree), flatten(target_tree)
  problems = []
  for name, leaf in wanted.items():
    if name not in saved:
      problems.append(f'parameter {name!r} with shape {_shape(leaf)} in the model is missing '
                      'from the checkpoint')
    elif _shape(saved[name]) != _shape(leaf):
      problems.append(f'parameter {name!r} has shape {_shape(saved[name])} in the checkpoint '
                      f'but {_shape(leaf)} in the model')
  for name, leaf in saved.items():
    if name not in wanted:
      problems.append(f'parameter {name!r} with shape {_shape(leaf)} in the checkpoint does '
                      'not exist in the model')
  if problems:
    more = f' (and {len(problems) - 1} more mismatches)' if len(problems) > 1 else ''
    raise IncompatibleCheckpointError(
        f'{where} does not fit the model: {problems[0]}{more}. Use a workdir that matches this '
        'config, or start a new one.')


def to_json(tree, path: str = 'extras'):
  """A JSON-ready copy of `tree`: mappings, sequences, scalars; arrays become lists.

  Raises TypeError naming the offending path for anything else (bytes, objects, PRNG keys),
  before any file is written.
  """
  if isinstance(tree, Mapping):
    return {str(k): to_json(v, f'{path}.{k}') for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v, f'{path}[{i}]') for i, v in enumerate(tree)]
  if tree is None or isinstance(tree, (bool, int, float, str)):
    return tree
  if isinstance(tree, (np.ndarray, np.generic, jax.Array)):
    if jax.dtypes.issubdtype(tree.dtype, jax.dtypes.prng_key):
      raise TypeError(f'{path} is a PRNG key array; store jax.random.key_data(key) instead')
    return np.asarray(tree).tolist()
  raise TypeError(f'{path} of type {type(tree).__name__} cannot be stored as JSON; convert it '
                  '(e.g. decode bytes with json.loads) before saving')


def _with_default_sharding(target):
  """Abstract leaves without a sharding are restored onto the first local device.

  Without this Orbax falls back to the sharding recorded at save time, which depends on the
  topology of the run that wrote the checkpoint.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fill(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    return leaf

  return jax.tree.map(fill, target)


def _short(error: BaseException) -> str:
  """One line for a log message: the root cause (Orbax wraps TensorStore errors generically)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  text = text if len(text) <= 300 else text[:300] + '...'
  return f'{type(error).__name__}: {text}'


def _shard_file(j: int, num_shards: int) -> str:
  return f'shard_{j}-of-{num_shards}.json'


def check_shard_files(folder: epath.Path, data, where: str) -> None:
  """Raises `DataStateError` unless `folder` has a state for every shard `data` loads."""
  missing = [j for j in data.shards if not (folder / _shard_file(j, data.num_shards)).exists()]
  if not missing:
    return
  written = sorted(p.name for p in folder.glob('shard_*-of-*.json')) if folder.exists() else []
  counts = sorted({int(n.rsplit('-of-', 1)[1].split('.')[0]) for n in written})
  saved = ' or '.join(map(str, counts)) or 'no'
  hint = (f' Resume with --config.data.num_shards={counts[0]} (any number of processes that '
          'divides it), or start a new --workdir.' if len(counts) == 1 else '')
  raise DataStateError(
      f'{where} holds the data position of {saved} data shard(s) ({len(written)} file(s)), but '
      f'this run reads {data.num_shards} shard(s) (data.num_shards, 0 = one per process; '
      f'{jax.process_count()} process(es) here), so it has no state for shard(s) {missing}.'
      + hint)


class DataShardsHandler(ocp.CheckpointHandler):
  """Orbax handler for the data position: one JSON file per data shard, written and read by
  the process that loads that shard (so any process count dividing the shard count fits)."""

  def save(self, directory: epath.Path, args: 'DataShardsSave') -> None:
    for j, state in args.states.items():
      (directory / _shard_file(j, args.num_shards)).write_text(state.decode())

  def restore(self, directory: epath.Path, args: 'DataShardsRestore'):
    data = args.iterator
    if data is None:
      return None
    check_shard_files(directory, data, str(directory))
    data.set_shard_states({j: (directory / _shard_file(j, data.num_shards)).read_text().encode()
                           for j in data.shards})
    data.start_prefetch()
    return data

  def metadata(self, directory: epath.Path):
    del directory

  def structure(self, directory: epath.Path):
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  states: dict
  num_shards: int


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  iterator: object = None  # None: leave the data position alone (evaluation restores)


def _everyone_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (itself in a single process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Periodic, asynchronous, keep-N checkpoints of a train state plus JSON extras.

  Typical loop::

    ckpt = Checkpointer(workdir, keep=3, save_interval_steps=1000)
    restored = ckpt.restore(abstract_state)   # None on a fresh workdir
    start, state, extras = restored if restored else (0, init_state, {})
    with PreemptionHandler() as preemption:
      for step in range(start, num_steps):
        state = train_step(state, batch)
        if preemption.should_stop:
          ckpt.save(step, state, extras, force=True)
          break
        ckpt.save(step, state, extras)   # writes only every save_interval_steps
    ckpt.close()                         # waits for the last asynchronous write
  """

  def __init__(self, workdir, *, keep: int | None = 3, async_save: bool = True,
               save_interval_steps: int = 1000, read_only: bool = False):
    if keep is not None and keep < 1:
      raise ValueError(f'keep={keep} is invalid: keep at least 1 checkpoint, or None for all')
    if save_interval_steps < 1:
      raise ValueError(f'save_interval_steps={save_interval_steps} is invalid: must be >= 1')
    self.workdir = epath.Path(workdir)
    self.data_restored = False
    self.directory = self.workdir / CHECKPOINT_DIR
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.StandardSave)
    registry.add(STATE, ocp.args.StandardRestore)
    registry.add(EXTRAS, ocp.args.JsonSave)
    registry.add(EXTRAS, ocp.args.JsonRestore)
    registry.add(DATA, DataShardsSave, DataShardsHandler)
    registry.add(DATA, DataShardsRestore, DataShardsHandler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed (or, with async saves, in-flight) step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, extras: Mapping[str, Any] | None = None, *,
           data=None, force: bool = False) -> bool:
    """Saves `state` and `extras` as one step if the save interval (or `force`) asks for it.

    Without `force`, a step is saved when it is a multiple of `save_interval_steps` or when
    no checkpoint exists yet (Orbax's initial-save policy, which proves early that saving
    works). A step that is already saved is a no-op. Returns whether a save was started.
    `data`, a `jaxformer.data.shards.ShardedIterator`, is saved one state per shard; its
    state is taken now, before this returns.
    With `async_save` the arrays are copied off the
    devices before this returns and written in the background; call `wait()` before relying
    on the files. Raises `NonFiniteError` for a NaN/Inf state and TypeError for non-JSON
    extras, in both cases before anything is written.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    assert_finite(state, f'state at step {step}')
    payload = to_json(dict(extras or {}, checksums=fingerprints(state)))
    items = {STATE: ocp.args.StandardSave(state), EXTRAS: ocp.args.JsonSave(payload)}
    if data is not None:
      items[DATA] = DataShardsSave(data.shard_states(), data.num_shards)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until an asynchronous save has committed; re-raises its error if it failed."""
    self._manager.wait_until_finished()

  def has_data_state(self, step: int) -> bool:
    return (self.directory / str(step) / DATA).exists()

  def check_data_state(self, step: int, data) -> None:
    """Raises `DataStateError` unless step `step` holds the state of every shard of `data`."""
    check_shard_files(self.directory / str(step) / DATA, data, f'checkpoint step {step}')

  def _restore_step(self, step: int, target, data=None):
    metadata = self._manager.item_metadata(step)
    tree = metadata[STATE] if STATE in metadata else None
    if tree is None:
      raise FileNotFoundError(f'no readable metadata for item {STATE!r}')
    check_compatible(getattr(tree, 'tree', tree), target,
                     where=f'checkpoint step {step} in {self.directory}')
    items = {STATE: ocp.args.StandardRestore(_with_default_sharding(target)),
             EXTRAS: ocp.args.JsonRestore()}
    if data is not None and self.has_data_state(step):
      self.check_data_state(step, data)
      items[DATA] = DataShardsRestore(data)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    self.data_restored = DATA in items
    extras = dict(restored[EXTRAS] or {})
    saved = extras.pop('checksums', None)
    if saved is not None:
      verify_fingerprints(restored[STATE], saved, f'checkpoint step {step} in {self.directory}')
    return restored[STATE], extras

  def restore(self, target, *, step: int | None = None, data=None, read_only: bool = False):
    """Restores into the structure, shapes and shardings of `target` (an abstract state).

    Returns `(step, state, extras)` from the newest readable step (or exactly `step`), or None
    when no checkpoint exists. With `data` (a checkpointable iterator) its state is restored
    too, and `self.data_restored` says whether the step had one. Unreadable newer steps
    are logged, moved to `<workdir>/checkpoints_corrupt` (left in place with `read_only`, as
    evaluation does) and skipped. Every array is checked against the checksum saved with it,
    so bytes changed in place count as unreadable too. Raises
    `IncompatibleCheckpointError` when the newest readable checkpoint does not fit `target`,
    `DataStateError` when its data state was written by another number of processes, and
    `CheckpointError` when checkpoints exist but none can be read.
    """
    self.wait()
    if step is not None:
      state, extras = self._restore_step(step, target, data)
      return step, state, extras
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failed = []
    for candidate in steps:
      error = None
      try:
        state, extras = self._restore_step(candidate, target, data)
      except (IncompatibleCheckpointError, DataStateError):
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
      if not _everyone_ok(error is None):
        error = error or RuntimeError('another process could not read this step')
      if error is not None:
        failed.append((candidate, _short(error)))
        log.warning('checkpoint step %d in %s cannot be restored (%s); %s', candidate,
                    self.directory, _short(error),
                    'trying the previous one' if candidate != steps[-1] else 'no older one left')
        continue
      if failed:
        if not read_only:
          self._move_aside([s for s, _ in failed])
        log.warning('restored checkpoint step %d after skipping unreadable step(s) %s',
                    candidate, [s for s, _ in failed])
      return candidate, state, extras
    reasons = '; '.join(f'step {s}: {reason}' for s, reason in failed)
    raise CheckpointError(
        f'{len(steps)} checkpoint(s) exist in {self.directory} but none can be restored '
        f'({reasons}). Refusing to start from scratch: repair or remove them, or choose '
        'another --workdir.')

  def _move_aside(self, steps: Sequence[int]) -> None:
    """Moves unreadable steps out of the manager's directory so training can save them anew."""
    if distributed.is_primary():
      corrupt = self.workdir / CORRUPT_DIR
      corrupt.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = self.directory / str(step)
        destination = corrupt / str(step)
        suffix = 1
        while destination.exists():
          destination = corrupt / f'{step}.{suffix}'
          suffix += 1
        source.rename(destination)
        log.warning('moved unreadable checkpoint step %d to %s', step, destination)
    distributed.barrier('checkpoints moved aside')
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending writes and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionHandler:
  """Context manager turning SIGTERM/SIGINT into `should_stop` for the train loop to poll.

  The loop checks `should_stop` once per step; when set it saves with `force=True`, waits and
  exits normally, so a preempted job leaves a complete checkpoint of the step it reached. A
  second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. The previous handlers come
  back on exit. Signals can only be installed from the main thread.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self.signal: int | None = None

  @property
  def should_stop(self) -> bool:
    return self.signal is not None

  @property
  def signal_name(self) -> str | None:
    return None if self.signal is None else signal.Signals(self.signal).name

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    log.warning('received %s: the train loop will save a checkpoint and stop',
                signal.Signals(signum).name)

  def __enter__(self) -> PreemptionHandler:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('PreemptionHandler must be entered from the main thread')
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in self._signals}
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
