"""ELECTRA (models/electra.py, task 'rtd'): the objective against a numpy reference from the
same logits, labels and masks; no gradient from the discriminator loss into the generator;
replacement labels; the generator config rules; config-time refusals; efficient attention
kinds; and the paper presets' parameter counts against Hugging Face's ELECTRA."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.models import build_model, family
from jaxformer.models.electra import generator_config
from jaxformer.train import step as step_lib
from jaxformer.train import tasks

B, T, V, MASK = 2, 12, 40, 3


def tiny(**kw):
  # The generator as wide as the discriminator: one set of parameter shapes, so initialising
  # compiles half the programs (the narrower generator and the embedding projections are
  # checked against Hugging Face in tests/interop/test_hf_electra.py).
  return family('electra', vocab_size=V, d_model=32, num_layers=2, max_length=T,
                attention=dict(num_heads=4, **kw.pop('attention', {})), ffn=dict(hidden_dim=64),
                electra={'generator_d_model': 32, **kw.pop('electra', {})}, **kw)


def batch(seed=0):
  """An mlm batch: row 1 padded after 8 tokens, about a third of the real tokens masked."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(4, V, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[1, 8:] = 0
  targets[seg == 0] = 0
  masked = (rng.random((B, T)) < 0.35) & (seg > 0)
  masked[0, 0] = masked[1, 1] = True
  inputs = np.where(masked, MASK, targets).astype(np.int32)
  return {'inputs': jnp.asarray(inputs), 'targets': jnp.asarray(targets),
          'loss_mask': jnp.asarray(masked, jnp.float32), 'segment_ids': jnp.asarray(seg)}


def rtd(model, cfg, b, deterministic=True):
  return tasks.compute_loss(model, 'rtd', b, cfg, tasks.LossConfig(),
                            deterministic=deterministic)


CFG = tiny()


@pytest.fixture(scope='module')
def electra():
  """(graphdef, params, rest, run): run(params, rest, batch) -> (loss, metrics, RTDOutput) of
  the task and of a direct call, from the same model state (so the same replacements); one
  compiled program for the whole module."""
  graphdef, params, rest = nnx.split(build_model(CFG, seed=3), nnx.Param, ...)

  @jax.jit
  def run(params, rest, b):
    # copy=True: each model gets its own RNG count (merged Variables would share theirs).
    loss, metrics = rtd(nnx.merge(graphdef, params, rest, copy=True), CFG, b)
    out = nnx.merge(graphdef, params, rest, copy=True).replaced_token_detection(
        b['inputs'], b['targets'], b['loss_mask'], segment_ids=b['segment_ids'])
    return loss, metrics, out

  return graphdef, params, rest, run


def test_rtd_objective_equals_a_numpy_reference(electra):
  _, params, rest, run = electra
  b = batch()
  loss, metrics, out = run(params, rest, b)
  gen = np.asarray(out.generator_logits, np.float64)
  disc = np.asarray(out.discriminator_logits, np.float64)
  corrupted = np.asarray(out.corrupted)
  targets, masked = np.asarray(b['targets']), np.asarray(b['loss_mask']) > 0
  real = np.asarray(b['segment_ids']) > 0
  np.testing.assert_array_equal(corrupted[~masked], targets[~masked])
  y = (corrupted != targets).astype(np.float64)
  np.testing.assert_array_equal(np.asarray(out.replaced), y > 0)
  assert y[masked].sum() > 0

  lse = np.log(np.exp(gen - gen.max(-1, keepdims=True)).sum(-1)) + gen.max(-1)
  nll = lse - np.take_along_axis(gen, targets[..., None], -1)[..., 0]
  mlm = nll[masked].mean()
  bce = np.logaddexp(0.0, disc) - y * disc
  disc_loss = bce[real].mean()
  np.testing.assert_allclose(float(metrics['mlm_loss']), mlm, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['rtd_loss']), disc_loss, rtol=1e-5)
  np.testing.assert_allclose(float(loss), mlm + 50.0 * disc_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['rtd_accuracy']),
                             ((disc > 0) == (y > 0))[real].mean(), atol=1e-6)
  np.testing.assert_allclose(float(metrics['accuracy']),
                             (gen.argmax(-1) == targets)[masked].mean(), atol=1e-6)
  np.testing.assert_allclose(float(metrics['replaced']), y[real].mean(), atol=1e-6)
  assert float(metrics['num_tokens']) == masked.sum()
  assert float(metrics['rtd_tokens']) == real.sum()


@pytest.mark.parametrize('sample', ['original', 'other'])
def test_a_sample_equal_to_the_original_is_labelled_original(electra, sample):
  graphdef, params, rest, run = electra
  model = nnx.merge(graphdef, params, rest, copy=True)  # the fixture's parameters stay as they are
  forced = 7 if sample == 'original' else 9
  model.generator.mlm.decoder.bias[...] = jnp.zeros((V,)).at[forced].set(1e4)
  b = batch(2)
  b['targets'] = jnp.where(b['loss_mask'] > 0, 7, b['targets'])  # every masked original is 7
  _, metrics, out = run(nnx.state(model, nnx.Param), rest, b)
  masked = np.asarray(b['loss_mask']) > 0
  assert (np.asarray(out.corrupted)[masked] == forced).all()
  np.testing.assert_array_equal(np.asarray(out.replaced), masked & (sample == 'other'))
  real = np.asarray(b['segment_ids']) > 0
  expected = masked.sum() / real.sum() if sample == 'other' else 0.0
  np.testing.assert_allclose(float(metrics['replaced']), expected, atol=1e-6)


def test_replacements_are_drawn_anew_each_step(electra):
  _, params, rest, run = electra
  b = batch(3)
  draw = lambda key: np.asarray(run(params, step_lib.with_dropout_key(rest, key), b)[2].corrupted)  # noqa: E731
  first, second = draw(jax.random.key(0)), draw(jax.random.key(1))
  np.testing.assert_array_equal(draw(jax.random.key(0)), first)  # same (seed, step), same draw
  assert not np.array_equal(first, second)


def test_eval_step_reports_the_discriminator(electra):
  graphdef, params, rest, run = electra
  b = batch(4)
  sums = jax.jit(step_lib.make_eval_step(graphdef, rest, task='rtd', model_cfg=CFG,
                                         loss_cfg=tasks.LossConfig()))(params, b)
  _, m, _ = run(params, step_lib.with_dropout_key(rest, jax.random.key(0)), b)
  np.testing.assert_allclose(sums['rtd_loss_sum'], m['rtd_loss'] * m['rtd_tokens'], rtol=1e-5)
  np.testing.assert_allclose(sums['rtd_correct_sum'], m['rtd_accuracy'] * m['rtd_tokens'],
                             rtol=1e-5)
  np.testing.assert_allclose(sums['nll_sum'], m['nll'] * m['num_tokens'], rtol=1e-5)


def test_discriminator_loss_sends_no_gradient_into_the_generator(electra):
  graphdef, params, rest, _ = electra
  b = batch(1)

  @jax.jit
  def grads(params, rest):  # d(rtd_loss, mlm_loss) / d(params): one backward pass for both
    def losses(p):
      m = rtd(nnx.merge(graphdef, p, rest, copy=True), CFG, b, False)[1]
      return jnp.stack([m['rtd_loss'], m['mlm_loss']])
    return jax.jacrev(losses)(params)

  g = {'.'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads(params, rest))}
  disc = {k: v[0] for k, v in g.items()}
  mlm = {k: v[1] for k, v in g.items()}
  generator = [k for k in g if k.startswith('generator.')]
  assert generator and all(not np.any(disc[k]) for k in generator)
  assert any(np.any(mlm[k]) for k in generator)  # the generator does learn, from the MLM term
  assert np.any(disc['discriminator.rtd.prediction.w'])
  # The shared embeddings learn from both terms.
  assert np.any(disc['discriminator.embedder.embed.embedding'])
  assert np.any(mlm['discriminator.embedder.embed.embedding'])


def test_generator_defaults_follow_electra():
  # ELECTRA-Small's generator: 1/4 wide, heads of the discriminator's width, FFN 4 x d.
  cfg = family('electra', d_model=256, num_layers=12, embed_dim=128,
               attention=dict(num_heads=4), ffn=dict(hidden_dim=1024))
  gen = generator_config(cfg)
  assert (gen.d_model, gen.num_heads, gen.ffn_hidden_dim, gen.num_layers) == (64, 1, 256, 12)
  assert gen.embed_width == 128 and gen.mlm_head and not gen.rtd_head


@pytest.mark.parametrize('overrides, match', [
    (dict(electra=dict(generator_d_model=12, generator_num_heads=5)),
     r'model.electra: the generator.*model.attention.num_heads=5'),
    (dict(electra=dict(generator_num_layers=0)), r'model.electra.generator_num_layers=0'),
    (dict(electra=dict(disc_weight=0.0)), r'model.electra.disc_weight=0.0'),
    (dict(mlm_head=True), r"model.mlm_head=True.*builds its own heads"),
])
def test_bad_electra_configs_are_refused_naming_the_field(overrides, match):
  with pytest.raises(ConfigError, match=match):
    tiny(**overrides)


def test_embed_dim_is_refused_where_nothing_projects_it():
  with pytest.raises(ConfigError, match=r"model.embed_dim=16.*'decoder'.*\['encoder', 'electra"):
    family('llama', d_model=32, embed_dim=16)
  family('llama', d_model=32, embed_dim=32)  # equal width: nothing to project


def test_rtd_needs_the_electra_family_and_refuses_a_pipeline():
  from jaxformer.train.experiment import Experiment, default_config
  with pytest.raises(ValueError, match="data.task='rtd' does not fit model.family='encoder'"):
    tasks.check_task('rtd', family('bert', d_model=32))
  config = default_config(model=tiny().to_dict(), data=dict(task='rtd', seq_len=T),
                          parallel=dict(mesh=dict(stage=2)))
  with pytest.raises(ConfigError, match=r"parallel.mesh.stage=2.*model.family='electra'"):
    Experiment.from_config(config)


@pytest.mark.parametrize('kind, gradients', [
    ('performer', False), pytest.param('performer', True, marks=pytest.mark.slow),
    pytest.param('nystrom', True, marks=pytest.mark.slow),
    pytest.param('linear', True, marks=pytest.mark.slow)])
def test_efficient_attention_kinds_train_and_ignore_padding(kind, gradients):
  cfg = tiny(attention=dict(kind=kind))
  graphdef, params, rest = nnx.split(build_model(cfg, seed=2), nnx.Param, ...)
  b = batch(5)
  noisy = jnp.where(b['segment_ids'] > 0, b['targets'], 11)

  @jax.jit
  def run(params, rest):
    model = lambda: nnx.merge(graphdef, params, rest, copy=True)  # noqa: E731
    loss_fn = lambda p: rtd(nnx.merge(graphdef, p, rest, copy=True), cfg, b, False)  # noqa: E731
    if gradients:
      (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
      (loss, metrics), g = loss_fn(params), {}
    return (loss, metrics, g, model()(b['targets'], segment_ids=b['segment_ids']).logits,
            model()(noisy, segment_ids=b['segment_ids']).logits)

  loss, metrics, g, one, two = run(params, rest)
  assert np.isfinite(float(loss)) and float(metrics['rtd_loss']) > 0
  if gradients:
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0
  # The discriminator ignores what padding holds.
  real = np.asarray(b['segment_ids']) > 0
  np.testing.assert_allclose(np.asarray(one)[real], np.asarray(two)[real], atol=1e-5)


@pytest.mark.parametrize('size', ['small', 'base'])
def test_paper_presets_have_hugging_face_electra_parameter_counts(size):
  """configs/electra.py at the paper's vocabulary = HF ElectraForPreTraining (discriminator)
  + ElectraForMaskedLM (generator) - the generator's embeddings, which ELECTRA shares."""
  import importlib.util
  import torch
  import transformers as T
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'electra.py')
  spec = importlib.util.spec_from_file_location('electra_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  m = dict(module.get_config(f'size={size}').model.to_dict(), vocab_size=30522)
  cfg = ModelConfig.from_dict(m)
  gen = generator_config(cfg)
  abstract = nnx.eval_shape(lambda: build_model(cfg))
  ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

  def hf(model_cls, c):
    with torch.device('meta'):
      model = model_cls(T.ElectraConfig(
          vocab_size=30522, embedding_size=c.embed_width, hidden_size=c.d_model,
          num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
          intermediate_size=c.ffn_hidden_dim, max_position_embeddings=c.position.max_length))
    return model, sum(p.numel() for p in model.parameters())

  _, disc = hf(T.ElectraForPreTraining, cfg)
  generator, gen_total = hf(T.ElectraForMaskedLM, gen)
  shared = sum(p.numel() for p in generator.electra.embeddings.parameters())
  assert ours == disc + gen_total - shared
