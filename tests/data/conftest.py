"""Small offline datasets, built once per session in a temporary data dir."""

import pytest

from jaxformer.data import DataConfig

# Builder options shared by the tests so each small dataset is generated once per session.
SPLITS = {'num_train': 300, 'num_validation': 40, 'num_test': 40}
LISTOPS = dict(SPLITS, num_train=120, min_length=20, max_length=120)


@pytest.fixture(scope='session')
def splits():
  return dict(SPLITS)


@pytest.fixture(scope='session')
def listops_options():
  return dict(LISTOPS)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def make_cfg(data_dir):
  def make(**kwargs):
    return DataConfig.from_dict({'data_dir': data_dir, **kwargs})
  return make
