"""The family registry (models/registry.py): every family is found through it, and a new one
is one registration."""

import dataclasses

import jax.numpy as jnp
import pytest

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.inference import decode
from jaxformer.models import build_model, family_dict, family_names, registry
from jaxformer.train import tasks


def test_every_preset_names_a_registered_family_and_every_family_has_a_preset():
  used = {family_dict(name)['family'] for name in family_names()}
  assert used == set(registry.names())


@pytest.mark.parametrize('name', registry.names())
def test_declared_capabilities_are_ones_the_code_knows(name):
  fam = registry.get(name)
  assert fam.tasks and set(fam.tasks) <= set(tasks.TASKS)
  assert fam.generation is None or fam.generation in decode.STARTS
  assert set(fam.depth_fields) <= {f.name for f in dataclasses.fields(ModelConfig)}
  assert callable(registry._resolve(fam.model))  # pylint: disable=protected-access
  if fam.check is not None:
    assert callable(registry._resolve(fam.check))  # pylint: disable=protected-access


def test_an_unknown_family_is_refused_with_the_registered_names():
  with pytest.raises(ConfigError, match=r"model.family='mamba2'.*allowed values are \[.*'decoder'"):
    ModelConfig(family='mamba2').validate()


def test_a_new_family_is_one_registration(monkeypatch):
  monkeypatch.setitem(registry._REGISTRY, 'my_lm', dataclasses.replace(  # pylint: disable=protected-access
      registry.get('decoder'), name='my_lm'))
  cfg = ModelConfig(family='my_lm', vocab_size=16, d_model=16, num_layers=1, max_length=8,
                    attention=ModelConfig().attention.__class__(num_heads=2),
                    ffn=ModelConfig().ffn.__class__(hidden_dim=32))
  model = build_model(cfg)
  assert model(jnp.zeros((1, 8), jnp.int32)).logits.shape == (1, 8, 16)
  tasks.check_task('lm', cfg)
  with pytest.raises(ValueError, match="data.task='mlm' does not fit model.family='my_lm'"):
    tasks.check_task('mlm', cfg)
  assert decode.model_kind(model) == 'decoder'


def test_registering_a_name_twice_with_another_definition_fails():
  with pytest.raises(ValueError, match='registered twice'):
    registry.register(dataclasses.replace(registry.get('decoder'), causal=False))
