"""Test set-up: 8 simulated CPU devices for sharding tests, set before jax is imported.

Every compiled XLA CPU executable (including each primitive run eagerly with a new shape) keeps
about three memory mappings alive while JAX caches it. Over the whole suite one pytest worker
compiles enough of them to reach Linux's `vm.max_map_count` (65530 by default), and the next
compilation aborts the process with no Python error (this killed a worker in
tests/models/test_reversible.py). Clearing JAX's caches after every test module keeps each
worker's mappings bounded; tests in one module still share their compilations.
"""

import gc
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No persistent compilation cache in the user's home from tests (and their subprocesses); the
# cache's own test names a directory of its own.
os.environ.setdefault('JAXFORMER_COMPILATION_CACHE', 'none')

import jaxformer  # noqa: E402,F401  (its XLA flag guard must run before JAX starts a backend)
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_executables():
  yield
  jax.clear_caches()
  gc.collect()
