"""Work directory: early write check, config records, parameter summary."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.train.workdir import (WorkdirError, config_hash, param_summary, prepare_workdir,
                                     save_config, save_param_summary)


def test_prepare_creates_nested_dirs_and_leaves_no_probe(tmp_path):
  path = prepare_workdir(tmp_path / 'a' / 'b')
  assert path == tmp_path / 'a' / 'b' and path.is_dir()
  assert list(path.iterdir()) == []


def test_unwritable_workdir_fails_early_with_an_actionable_message(tmp_path):
  # A path below a regular file cannot be created by anyone, root included (chmod would not
  # stop root, which runs these tests).
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(WorkdirError) as info:
    prepare_workdir(blocker / 'run')
  message = str(info.value)
  assert message.startswith(f'cannot write to {blocker / "run"}: ')
  assert 'Not a directory' in message
  assert message.endswith('choose another --workdir or fix permissions')
  with pytest.raises(WorkdirError, match='File exists|Not a directory'):
    prepare_workdir(blocker)  # an existing file is not a directory


def _config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({'d_model': 32, 'dtype': jnp.bfloat16, 'sizes': (1, 2)})
  config.optim = ml_collections.ConfigDict({'lr': 3e-4})
  return config


def test_save_config_json_and_repr(tmp_path):
  config = _config()
  path = save_config(tmp_path, config)
  assert json.loads(path.read_text()) == {
      'model': {'d_model': 32, 'dtype': 'bfloat16', 'sizes': [1, 2]},
      'optim': {'lr': 3e-4}
  }
  assert (tmp_path / 'config.txt').read_text() == repr(config) + '\n'
  (tmp_path / 'm').mkdir()
  saved = json.loads(save_config(tmp_path / 'm', ModelConfig()).read_text())
  assert saved['d_model'] == ModelConfig().d_model
  assert saved['attention']['num_heads'] == ModelConfig().attention.num_heads
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'config.txt', 'm']


def test_config_hash_tracks_values_not_key_order():
  a = ml_collections.ConfigDict({'x': 1, 'y': {'z': 2.0}})
  b = ml_collections.ConfigDict({'y': {'z': 2.0}, 'x': 1})
  c = ml_collections.ConfigDict({'x': 1, 'y': {'z': 2.5}})
  assert config_hash(a) == config_hash(b) != config_hash(c)
  assert len(config_hash(a)) == 16


def test_param_summary_table_and_total(tmp_path):

  class Tiny(nnx.Module):

    def __init__(self, *, rngs):
      self.embed = nnx.Embed(10, 8, rngs=rngs)
      self.out = nnx.Linear(8, 4, use_bias=True, rngs=rngs, param_dtype=jnp.bfloat16)

  state = nnx.state(Tiny(rngs=nnx.Rngs(0)), nnx.Param)
  text = param_summary(state)
  lines = text.splitlines()
  assert lines[0].split() == ['path', 'shape', 'dtype', 'count']
  rows = {line.split()[0]: line for line in lines[2:-1]}
  assert set(rows) == {'embed/embedding', 'out/bias', 'out/kernel'}
  assert rows['embed/embedding'].split()[-1] == '80' and 'float32' in rows['embed/embedding']
  assert '(8, 4)' in rows['out/kernel'] and 'bfloat16' in rows['out/kernel']
  # 80 + 32 + 4 parameters; 80 * 4 + 36 * 2 = 392 bytes
  assert lines[-1] == 'total: 116 parameters in 3 arrays (392 B)'
  abstract = nnx.eval_shape(lambda: nnx.state(Tiny(rngs=nnx.Rngs(0)), nnx.Param))
  assert param_summary(abstract) == text
  path = save_param_summary(tmp_path, state)
  assert path.read_text() == text + '\n'
  big = {'w': jax.ShapeDtypeStruct((1024, 1024, 3), jnp.float32)}
  assert param_summary(big).splitlines()[-1] == 'total: 3,145,728 parameters in 1 arrays (12.0 MiB)'
