"""configs/lra_listops.py: every padding-capable attention kind builds at both presets, the
[CLS] logits ignore padding, and the learning rate is LRA's schedule.

tests/test_configs.py trains the default (dense) tiny preset; here each kind's tiny model runs
forward, and each kind's full model (4 x 512 at length 2048, with LENGTH_OPTIONS) is only
traced (`nnx.eval_shape`), which checks that its options are accepted without allocating it.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.models import build_model
from jaxformer.train import schedules
from jaxformer.train.experiment import Experiment, load_config

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                    'lra_listops.py')


def experiment(arg):
  return Experiment.from_config(load_config(PATH, arg))


def kinds():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('lra_listops_config', PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.padding_kinds()


KINDS = kinds()


@pytest.mark.parametrize('kind', KINDS)
def test_tiny_model_classifies_from_cls_and_ignores_padding(kind):
  exp = experiment(f'size=tiny,kind={kind}')
  model = build_model(exp.model, seed=0)
  b, t = 2, exp.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (b, t), 5, exp.model.vocab_size)
  valid = jnp.arange(t)[None] < jnp.array([[t], [40]])
  segment_ids = valid.astype(jnp.int32)
  call = nnx.jit(lambda m, x: m(x, segment_ids=segment_ids).logits)
  logits = call(model, jnp.where(valid, tokens, 0))
  assert logits.shape == (b, 10) and np.all(np.isfinite(logits))
  junk = jnp.where(valid, tokens, jax.random.randint(jax.random.key(1), (b, t), 5, 20))
  np.testing.assert_allclose(call(model, junk), logits, atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_full_model_builds_at_length_2048(kind):
  exp = experiment(f'size=full,kind={kind}')
  assert (exp.data.seq_len, exp.model.max_length, exp.train.batch_size) == (2048, 2048, 32)
  assert (exp.model.num_layers, exp.model.d_model, exp.model.num_heads,
          exp.model.ffn_hidden_dim) == (4, 512, 8, 1024)
  abstract = nnx.eval_shape(lambda: build_model(exp.model, seed=0))
  assert nnx.state(abstract, nnx.Param)


def test_non_padding_kind_is_refused_with_the_allowed_kinds():
  with pytest.raises(ValueError, match='supports padding') as e:
    load_config(PATH, 'kind=no_such_kind')
  assert 'dot_product' in str(e.value)


def test_schedule_is_lra_rsqrt_with_linear_warmup():
  """LRA: lr(s) = 0.05 * min(1, s / 1000) / sqrt(max(s, 1000)) (train_utils factors)."""
  optim = experiment('size=full').optim
  assert (optim.optimizer, optim.b1, optim.b2, optim.eps, optim.weight_decay) == \
      ('adamw', 0.9, 0.98, 1e-9, 0.1)
  lr = schedules.make_schedule(optim)
  steps = np.array([1, 10, 500, 999, 1000, 1001, 2500, 4999], np.float32)
  lra = 0.05 * np.minimum(1.0, steps / 1000) / np.sqrt(np.maximum(steps, 1000))
  np.testing.assert_allclose(np.asarray(jax.vmap(lr)(steps)), lra, rtol=1e-5)
