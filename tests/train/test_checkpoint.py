"""Checkpointer: round trip, keep-N, atomic commit, corruption fallback, shape checks, NaN guard,
preemption."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.checkpoint import (Checkpointer, CheckpointError, IncompatibleCheckpointError,
                                        NonFiniteError, PreemptionHandler, assert_finite)

REPO = pathlib.Path(__file__).resolve().parents[2]

# After a failed read (the corruption tests), TensorStore callbacks can reach Orbax's closed
# asyncio loop; pytest reports that as an unraisable exception in whichever test runs next.
# The noise comes from inside Orbax, not from the checkpoint under test.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


_NOISE = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


def make_state(value: float):
  """Distinct per value; the noise keeps the kernel's data incompressible."""
  d = 64
  return {
      'params': {
          'w': jnp.asarray(value + _NOISE),
          'b': jnp.full((d,), -value, jnp.float32)
      },
      'count': jnp.asarray(int(value), jnp.int32),
  }


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def saved_run(tmp_path, steps=(1, 2), **kwargs):
  ckpt = Checkpointer(tmp_path, keep=3, save_interval_steps=1, **kwargs)
  for step in steps:
    assert ckpt.save(step, make_state(float(step)), {'step': step, 'data': {'pos': 10 * step}})
  ckpt.wait()
  return ckpt


class _Model(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.rngs = rngs


def _train_state(seed):
  model = _Model(rngs=nnx.Rngs(seed, dropout=seed + 1))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  return nnx.state((model, optimizer))


def _as_data(tree):
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def test_nnx_train_state_round_trip(tmp_path):
  state = _train_state(0)
  extras = {'iterator': {'index': 7}, 'rng': [1, 2], 'config_hash': 'abc', 'loss': 2.5}
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.save(3, state, extras)
  with Checkpointer(tmp_path) as ckpt:
    step, restored, restored_extras = ckpt.restore(nnx.eval_shape(lambda: _train_state(1)))
  assert step == 3 and restored_extras == extras
  assert isinstance(restored, nnx.State)
  chex.assert_trees_all_equal(_as_data(restored), _as_data(state))
  model = _Model(rngs=nnx.Rngs(5, dropout=6))
  nnx.update(model, restored[0])
  chex.assert_trees_all_equal(model.dense.kernel[...], state[0]['dense']['kernel'][...])


def test_restore_returns_none_without_checkpoints(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore(abstract(make_state(0.))) is None


def test_interval_keep_and_force(tmp_path):
  with Checkpointer(tmp_path, keep=2, save_interval_steps=3) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, make_state(float(s)))]
    # the first step is always saved (nothing exists yet), then every third step
    assert saved == [1, 3, 6, 9]
    assert ckpt.save(10, make_state(10.), force=True)
    assert not ckpt.save(10, make_state(10.), force=True)  # already saved: a no-op, not an error
    ckpt.wait()
    assert ckpt.all_steps() == [9, 10]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '9']


def test_half_written_step_is_never_listed(tmp_path):
  saved_run(tmp_path, steps=(1,)).close()
  tmp = tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp' / 'state'
  tmp.mkdir(parents=True)
  (tmp / '_METADATA').write_text('{"half": ')
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.latest_step() == 1
    step, state, _ = ckpt.restore(abstract(make_state(0.)))
    assert step == 1
    chex.assert_trees_all_equal(state, make_state(1.))
    assert ckpt.save(2, make_state(2.))  # a save first finishes the clean-up of leftovers
    ckpt.wait()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


def _largest_file(directory):
  files = [p for p in directory.rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir):
  path = _largest_file(step_dir / 'state')
  assert path.stat().st_size > 64 * 64 * 4 // 2  # the kernel's data, not a small index file
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2)


def _delete_state_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').unlink()


def _garble_state_metadata(step_dir):
  (step_dir / 'state' / '_METADATA').write_bytes(b'{"tree_metadata": \x00\xff garbage')


def _garble_extras(step_dir):
  (step_dir / 'extras' / 'metadata').write_text('{"step": 2, "da')


def _delete_manifest(step_dir):
  (step_dir / 'state' / 'manifest.ocdbt').unlink()


@pytest.mark.parametrize('corrupt', [
    _truncate_array_file, _delete_state_metadata, _garble_state_metadata, _garble_extras,
    _delete_manifest
])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
  saved_run(tmp_path).close()
  corrupt(tmp_path / 'checkpoints' / '2')
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    with caplog.at_level('WARNING', logger=ckpt_lib.__name__):
      step, state, extras = ckpt.restore(abstract(make_state(0.)))
    assert step == 1 and extras == {'step': 1, 'data': {'pos': 10}}
    chex.assert_trees_all_equal(state, make_state(1.))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert any('checkpoint step 2' in m and 'cannot be restored' in m for m in warnings), warnings
    # the unreadable step is kept for inspection, out of the way of the resumed run
    assert (tmp_path / 'checkpoints_corrupt' / '2').is_dir()
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, make_state(20.), {'step': 2})
    ckpt.wait()
    step, state, _ = ckpt.restore(abstract(make_state(0.)))
  assert step == 2
  chex.assert_trees_all_equal(state, make_state(20.))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  saved_run(tmp_path).close()
  for step in ('1', '2'):
    _delete_state_metadata(tmp_path / 'checkpoints' / step)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r'2 checkpoint\(s\) exist.*step 2: .*step 1: '):
      ckpt.restore(abstract(make_state(0.)))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # left in place


def test_incompatible_shape_is_refused_naming_path_and_shapes(tmp_path):
  saved_run(tmp_path).close()
  target = abstract(make_state(0.))
  target['params']['w'] = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(IncompatibleCheckpointError) as info:
      ckpt.restore(target)
  message = str(info.value)
  assert "'params/w'" in message and '(64, 64)' in message and '(32, 64)' in message
  assert 'checkpoint step 2' in message


def test_missing_and_extra_parameters_are_refused(tmp_path):
  saved_run(tmp_path).close()
  with Checkpointer(tmp_path) as ckpt:
    extra = abstract(make_state(0.))
    extra['params']['c'] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(IncompatibleCheckpointError, match=r"'params/c' with shape \(3,\) in the "
                       'model is missing from the checkpoint'):
      ckpt.restore(extra)
    missing = abstract(make_state(0.))
    del missing['params']['b']
    with pytest.raises(IncompatibleCheckpointError, match=r"'params/b' with shape \(64,\) in the "
                       'checkpoint does not exist in the model'):
      ckpt.restore(missing)
    assert ckpt.all_steps() == [1, 2]  # an incompatible checkpoint is not treated as corrupt


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_state_never_replaces_a_good_checkpoint(tmp_path, bad):
  ckpt = saved_run(tmp_path, steps=(1,))
  state = make_state(2.)
  state['params']['b'] = state['params']['b'].at[5].set(bad)
  with pytest.raises(NonFiniteError, match="'params/b'"):
    ckpt.save(2, state, {'step': 2}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  step, restored, _ = ckpt.restore(abstract(make_state(0.)))
  ckpt.close()
  assert step == 1
  chex.assert_trees_all_equal(restored, make_state(1.))


def test_assert_finite_checks_only_floating_leaves():
  tree = {
      'bf16': jnp.ones((3,), jnp.bfloat16),
      'count': jnp.asarray(3),
      'key': jax.random.key(0),
      'py': 1.0
  }
  assert_finite(tree)
  tree['bf16'] = tree['bf16'].at[1].set(jnp.inf)
  with pytest.raises(NonFiniteError, match=r"1 of 2 arrays, first at 'bf16'"):
    assert_finite(tree, 'tree')


def test_non_json_extras_fail_before_writing(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    with pytest.raises(TypeError, match=r'extras.iterator of type bytes'):
      ckpt.save(1, make_state(1.), {'iterator': b'{"index": 3}'})
    with pytest.raises(TypeError, match='PRNG key'):
      ckpt.save(1, make_state(1.), {'rng': jax.random.key(0)})
    assert ckpt.save(1, make_state(1.), {'rng': jax.random.key_data(jax.random.key(0))})
    ckpt.wait()
    _, _, extras = ckpt.restore(abstract(make_state(0.)))
  assert extras == {'rng': [0, 0]}


def test_restore_into_sharded_target(tmp_path):
  saved_run(tmp_path).close()
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  target = abstract(make_state(0.))
  target['params']['w'] = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding)
  with Checkpointer(tmp_path) as ckpt:
    _, state, _ = ckpt.restore(target)
  assert state['params']['w'].sharding == sharding
  chex.assert_trees_all_equal(state, make_state(2.))


def test_preemption_handler_sets_flag_and_restores_handlers():
  calls = []
  previous_int = signal.getsignal(signal.SIGINT)
  previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
  try:
    with PreemptionHandler() as preemption:
      assert not preemption.should_stop
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 5
      while not preemption.should_stop and time.time() < deadline:
        time.sleep(0.01)
      assert preemption.should_stop and preemption.signal_name == 'SIGTERM'
      with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous_int
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not calls and time.time() < deadline:
      time.sleep(0.01)
    assert len(calls) == 1
  finally:
    signal.signal(signal.SIGTERM, previous)


_PREEMPTED_LOOP = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from jaxformer.train.checkpoint import Checkpointer, PreemptionHandler

    ckpt = Checkpointer(sys.argv[1], keep=2, save_interval_steps=1000)
    state = {'w': jnp.zeros((32, 32)), 'step': jnp.asarray(0)}
    with PreemptionHandler() as preemption:
      step = 0
      while True:
        step += 1
        state = {'w': state['w'] + 1.0, 'step': jnp.asarray(step)}
        if preemption.should_stop:
          ckpt.save(step, state, {'position': step, 'signal': preemption.signal_name}, force=True)
          ckpt.wait()
          break
        ckpt.save(step, state, {'position': step})
        if step == 5:
          print('READY', flush=True)
        time.sleep(0.005)
    ckpt.close()
    print('SAVED', step, flush=True)
""")


def test_sigterm_leaves_a_complete_restorable_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, '-c', _PREEMPTED_LOOP, str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert proc.stdout.readline().strip() == 'READY', proc.stderr.read()
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  saved_step = int(out.split()[-1])
  assert saved_step > 5
  assert not [p for p in os.listdir(tmp_path / 'checkpoints') if 'tmp' in p]
  target = {
      'w': jax.ShapeDtypeStruct((32, 32), jnp.float32),
      'step': jax.ShapeDtypeStruct((), jnp.int32)
  }
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, saved_step]
    step, state, extras = ckpt.restore(target)
  assert step == saved_step
  assert extras == {'position': saved_step, 'signal': 'SIGTERM'}
  chex.assert_trees_all_equal(state, {
      'w': jnp.full((32, 32), float(saved_step)),
      'step': jnp.asarray(saved_step, jnp.int32)
  })


def test_data_state_of_another_shard_count_is_refused_with_the_setting_that_resumes_it(tmp_path):
  """A run whose data was cut into 2 shards (two processes) cannot be resumed as 1 shard: the
  error names the setting that resumes it on any process count dividing 2."""
  from types import SimpleNamespace
  from jaxformer.train.checkpoint import DataStateError, check_shard_files
  from etils import epath
  folder = epath.Path(tmp_path)
  for j in range(2):
    (folder / f'shard_{j}-of-2.json').write_text('{}')
  check_shard_files(folder, SimpleNamespace(shards={0: None, 1: None}, num_shards=2), 'step 5')
  check_shard_files(folder, SimpleNamespace(shards={1: None}, num_shards=2), 'step 5')
  with pytest.raises(DataStateError, match=r'data position of 2 data shard.*this run reads 1 '
                                           r'shard.*--config.data.num_shards=2'):
    check_shard_files(folder, SimpleNamespace(shards={0: None}, num_shards=1), 'step 5')


def _numpy_fingerprint(x) -> int:
  """The checksum's definition on the whole array: sum_i bits_i (i * 0x9E3779B1 + 1) mod 2^32."""
  x = np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  bits = x.reshape(-1).view(unsigned).astype(np.uint64)
  weights = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 + 1) % 2**32
  return int(np.sum(bits * weights % 2**32) % 2**32)


def test_checksums_follow_their_definition_on_every_sharding():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('a', 'b'))
  arrays = {
      'f32': jax.random.normal(jax.random.key(0), (8, 12)),
      'bf16': jax.random.normal(jax.random.key(1), (8, 8, 6), jnp.bfloat16),
      'int': jnp.arange(32, dtype=jnp.int32).reshape(8, 4) * 7919,
      'bool': jnp.arange(64).reshape(8, 8) % 3 == 0,
      'key': jax.random.split(jax.random.key(2), 8),
  }
  want = {name: _numpy_fingerprint(x) for name, x in arrays.items()}
  assert ckpt_lib.fingerprints(arrays) == want
  for spec in (P(), P('a'), P('b'), P(('a', 'b')), P('a', 'b')):
    placed = {name: jax.device_put(x, NamedSharding(mesh, P(*spec[:x.ndim])))
              for name, x in arrays.items()}
    assert ckpt_lib.fingerprints(placed) == want, spec
  changed = dict(arrays, f32=arrays['f32'].at[5, 7].add(1e-6))
  assert ckpt_lib.fingerprints(changed)['f32'] != want['f32']
