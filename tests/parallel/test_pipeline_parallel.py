"""Pipeline parallelism (issue 11): the schedule, and pipelined models equal unpipelined ones.

* The schedule (jaxformer/parallel/pipeline.py) on a stack of tanh layers: every task runs
  once, in order; outputs and gradients equal the layers applied one after the other; the idle
  fraction of the executed trace is (S - 1) / (R M + S - 1).
* Models: a pipelined model's logits, and the gradients of its loss, equal the unpipelined
  model's (fp32, 1e-5) for GPipe and circular schedules, S = 2 and 4, several micro-batch counts,
  on meshes that shard the stages over devices (pp2 x dp4, pp4 x tp2, ...) and on one device
  (virtual stages); decoder, encoder, encoder-decoder and MoE families.
* Training: pp2 x dp4, pp4 x tp2 and pp2 x fsdp2 x tp2 steps give the one-device loss and
  parameters (with optim.grad_accum_steps = M micro-batches on both), a 20-step AdamW run tracks
  the one-device curve, and the train command logs the one-device losses.
* Refusals: families, options and combinations the pipeline cannot run, named at config time.

Residual dropout is off in the equivalence tests: a pipelined step draws its dropout masks per
micro-batch inside the stages, not with the unpipelined run's keys (tested separately).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parallel_helpers import (LINEAR_OPTIM, LLAMA, ONE_DEVICE, OPTIM, experiment, lm_batches,
                              max_abs_diff, one_device, program, train)
from test_layouts import BERT, MIXTRAL, T5, mlm_batches, seq2seq_batches

from jaxformer.config import ConfigError
from jaxformer.parallel import pipeline as pl
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout
from jaxformer.train import tasks
from jaxformer.train.step import with_dropout_key

# ---------------------------------------------------------------------- the schedule


def _tanh_layers(w, x):
  for g in range(w.shape[0]):
    x = jnp.tanh(x @ w[g])
  return x


@pytest.mark.parametrize('stages,repeats,microbatches', [
    (2, 1, 1), (4, 1, 6), (2, 2, 5), (4, 2, 4),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [(2, 1, 3), (4, 1, 4), (2, 2, 2),
                                                         (4, 2, 6)])])
def test_schedule_equals_the_layers_in_sequence(stages, repeats, microbatches):
  spec = pl.PipelineSpec(stages, microbatches, repeats)
  rng = np.random.default_rng(stages * 100 + repeats * 10 + microbatches)
  groups = 2 * stages * repeats
  w = jnp.asarray(rng.normal(size=(groups, 8, 8)) * 0.5, jnp.float32)
  x = jnp.asarray(rng.normal(size=(microbatches, 3, 8)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=(microbatches,)), jnp.float32)

  def stage_fn(wc, xs, sd, m):
    y = _tanh_layers(wc, xs) * sd
    return y, {'calls': jnp.float32(1), 'micro': m.astype(jnp.float32)}

  def piped(w, x):
    # The side input multiplies each chunk's output by its micro-batch's scale.
    out, aux, trace = pl.run(stage_fn, pl.to_stages(w, spec), x, scale, spec)
    return out, aux, trace

  def sequential(w, x):
    ys = []
    for m in range(microbatches):
      y = x[m]
      for c in range(stages * repeats):
        per = groups // (stages * repeats)
        y = _tanh_layers(w[c * per:(c + 1) * per], y) * scale[m]
      ys.append(y)
    return jnp.stack(ys)

  out, aux, trace = jax.jit(piped)(w, x)
  np.testing.assert_allclose(out, sequential(w, x), atol=1e-6, rtol=0)
  # Every (micro-batch, repeat) task ran once on every stage, and only those.
  assert aux['calls'] == stages * repeats * microbatches
  assert aux['micro'] == stages * repeats * sum(range(microbatches))
  np.testing.assert_array_equal(trace, pl.planned_trace(spec))
  assert pl.idle_fraction(trace) == pytest.approx(
      (stages - 1) / (repeats * microbatches + stages - 1), abs=1e-12)
  loss = lambda f: lambda w, x: jnp.sum(f(w, x)[0] ** 2) if f is piped else jnp.sum(f(w, x) ** 2)  # noqa: E731
  g_piped = jax.grad(loss(piped), argnums=(0, 1))(w, x)
  g_seq = jax.grad(loss(sequential), argnums=(0, 1))(w, x)
  for a, b in zip(g_piped, g_seq):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_circular_schedule_needs_as_many_microbatches_as_stages():
  with pytest.raises(ValueError, match='at least as many micro-batches'):
    pl.PipelineSpec(4, 2, 2)


# ---------------------------------------------------------------------- models

MODEL = dict(LLAMA, num_layers=4, residual_dropout=0.0)


def _grads_and_logits(exp, devices, batch, spec=None):
  """Logits of the batch and the gradient of the mean micro-batch loss, deterministic."""
  prog = program(exp, devices)
  layout = prog.layout if spec is None else Layout(prog.layout.mesh, prog.layout.rules,
                                                   pipeline=spec)
  m_ = exp.optim.grad_accum_steps
  task = exp.data.task

  def merged(params):  # fresh RNG variables: a traced model must not mutate prog.rest
    return nnx.merge(prog.graphdef, params, with_dropout_key(prog.rest, jax.random.key(0)))

  def loss(params, batch):
    model = merged(params)
    if layout.pipeline is not None:
      return tasks.compute_loss(model, task, batch, exp.model, tasks.LossConfig(),
                                deterministic=True, microbatches=m_)[0]
    # Unpipelined: gradient accumulation's mean over micro-batches.
    micro = jax.tree.map(lambda a: a.reshape((m_, a.shape[0] // m_) + a.shape[1:]), batch)
    return jnp.mean(jnp.stack([
        tasks.compute_loss(model, task, jax.tree.map(lambda a: a[i], micro), exp.model,
                           tasks.LossConfig(), deterministic=True)[0] for i in range(m_)]))

  def logits(params, batch):
    model = merged(params)
    args, kwargs = tasks.model_inputs(task, batch)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model(*args, deterministic=True, **kwargs).logits

  params = prog.init_state()['params']
  batch = {k: jax.device_put(v, prog.batch_sharding) for k, v in batch.items()}
  grads = jax.jit(layout.wrap(jax.grad(loss)))(params, batch)
  out = jax.jit(layout.wrap(logits))(params, batch)
  return np.asarray(out), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def _pp(mesh, repeats=1):
  return dict(preset='dp_fsdp_tp', mesh=mesh, pipeline={'repeats': repeats})


CASES = {
    # name: (family, model, task, batches, mesh, repeats, micro-batches)
    'pp2_dp4_gpipe_m1': ('llama', MODEL, 'lm', lm_batches, {'stage': 2, 'data': 4}, 1, 1),
    'pp2_dp4_gpipe_m4': ('llama', MODEL, 'lm', lm_batches, {'stage': 2, 'data': 4}, 1, 4),
    'pp2_dp2_circular_m4': ('llama', MODEL, 'lm', lm_batches, {'stage': 2, 'data': 2, 'tensor': 2},
                            2, 4),
    'pp4_tp2_gpipe_m2': ('llama', MODEL, 'lm', lm_batches, {'stage': 4, 'tensor': 2}, 1, 2),
    'pp4_dp2_circular_m4': ('llama', dict(MODEL, num_layers=8), 'lm', lm_batches,
                            {'stage': 4, 'data': 2}, 2, 4),
    't5_pp2_dp4': ('t5', dict(T5, num_layers=2), 'span_corruption', seq2seq_batches,
                   {'stage': 2, 'data': 4}, 1, 2),
    'bert_pp2_tp2_dp2': ('bert', BERT, 'mlm', mlm_batches, {'stage': 2, 'tensor': 2, 'data': 2},
                         1, 2),
    'mixtral_pp2_dp4': ('mixtral', MIXTRAL, 'lm', lambda n: lm_batches(n, seed=3),
                        {'stage': 2, 'data': 4}, 1, 4),
    # Groups of [Mamba, attention] layers; the Mamba inner width is split over 'tensor'.
    'mamba_hybrid_pp2_tp2_dp2': ('mamba', dict(
        MODEL, position=dict(kind='rope'), mamba=dict(d_state=4, attention_every=2, ffn=True)),
        'lm', lm_batches, {'stage': 2, 'data': 2, 'tensor': 2}, 1, 2),
}
# The default suite keeps circular with tensor parallelism and MoE; the training steps below
# cover pp2 x dp4 and pp4 x tp2 again.
SLOW = ('pp2_dp4_gpipe_m1', 'pp2_dp4_gpipe_m4', 'pp4_tp2_gpipe_m2', 'pp4_dp2_circular_m4',
        'bert_pp2_tp2_dp2', 't5_pp2_dp4', 'mamba_hybrid_pp2_tp2_dp2')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_pipelined_model_equals_unpipelined(name):
  fam, model, task, batches, mesh, repeats, m_ = CASES[name]
  optim = dict(LINEAR_OPTIM, grad_accum_steps=m_)
  batch = batches(1)[0]
  ref = _grads_and_logits(experiment(fam, model, task=task, parallel=ONE_DEVICE, optim=optim),
                          one_device(), batch)
  exp = experiment(fam, model, task=task, parallel=_pp(mesh, repeats), optim=optim)
  got = _grads_and_logits(exp, jax.devices(), batch)
  np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0)
  assert max_abs_diff(got[1], ref[1]) < 1e-5


@pytest.mark.slow
def test_virtual_stages_on_one_device_equal_unpipelined():
  """The schedule alone (no mesh axis): four stages, two repeats, on one device."""
  optim = dict(LINEAR_OPTIM, grad_accum_steps=4)
  exp = experiment('llama', dict(MODEL, num_layers=8), parallel=ONE_DEVICE, optim=optim)
  batch = lm_batches(1)[0]
  ref = _grads_and_logits(exp, one_device(), batch)
  got = _grads_and_logits(exp, one_device(), batch, spec=pl.PipelineSpec(4, 4, 2))
  np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0)
  assert max_abs_diff(got[1], ref[1]) < 1e-5


@pytest.mark.parametrize('name', ['vit_remat',
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ('perceiver', 'perceiver_repeats'))])
def test_other_stack_families_pipelined_on_virtual_stages_equal_unpipelined(name):
  """ViT (with remat inside the stages) and Perceiver (several stacks over latents), two
  virtual stages on one device: logits and the gradient of sum(logits^2)."""
  from jaxformer.models import build_model, family  # pylint: disable=import-outside-toplevel
  from jaxformer.parallel.config import ParallelConfig  # pylint: disable=import-outside-toplevel
  if name == 'vit_remat':
    cfg = family('vit', vocab_size=16, d_model=32, num_layers=2, max_length=64, image_size=16,
                 patch_size=4, num_labels=5, attention=dict(num_heads=4),
                 ffn=dict(hidden_dim=64), remat='full')
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  else:
    cfg = family('perceiver', vocab_size=32, d_model=32, num_layers=2, num_labels=3,
                 attention=dict(num_heads=4), ffn=dict(hidden_dim=64), max_length=64,
                 perceiver=dict(num_latents=8, fourier_bands=4,
                                num_repeats=2 if name == 'perceiver_repeats' else 1))
    x = jax.random.randint(jax.random.key(1), (4, 12), 0, 32)
  model = build_model(cfg, seed=8)
  parallel = ParallelConfig(mesh={'data': 1})
  plain = Layout(make_mesh(parallel, one_device()), parallel.logical_rules())
  piped = Layout(plain.mesh, plain.rules, pipeline=pl.PipelineSpec(2, 2))

  def logits(m, x, layout):
    with layout.active():
      return m(x).logits

  def grads(m, x, layout):
    g = nnx.grad(lambda m: jnp.sum(logits(m, x, layout) ** 2))(m)
    return nnx.to_pure_dict(nnx.state(g))

  for f in (logits, grads):
    ref = nnx.jit(f, static_argnums=2)(model, x, plain)
    got = nnx.jit(f, static_argnums=2)(model, x, piped)
    assert max_abs_diff(got, ref) < 1e-5, f.__name__


# ---------------------------------------------------------------------- training

LAYOUTS = {
    'pp2_dp4': (dict(mesh={'stage': 2, 'data': 4}), 4),
    'pp2_dp4_circular': (dict(mesh={'stage': 2, 'data': 4}, pipeline={'repeats': 2}), 4),
    'pp4_tp2': (dict(mesh={'stage': 4, 'tensor': 2}), 4),
    'pp2_fsdp2_tp2': (dict(mesh={'stage': 2, 'fsdp': 2, 'tensor': 2}), 2),
}


@pytest.mark.parametrize('layout', [pytest.param(n, marks=pytest.mark.slow)
                                    if n == 'pp2_dp4_circular' else n for n in LAYOUTS])
def test_training_step_equals_one_device(layout):
  parallel, m_ = LAYOUTS[layout]
  optim = dict(LINEAR_OPTIM, grad_accum_steps=m_)
  ref_loss, ref_params = train(program(experiment('llama', MODEL, parallel=ONE_DEVICE,
                                                  optim=optim), one_device()), lm_batches(1))
  prog = program(experiment('llama', MODEL, parallel=dict(preset='dp_fsdp_tp', **parallel),
                            optim=optim))
  assert prog.layout.pipeline == pl.PipelineSpec(parallel['mesh']['stage'], m_,
                                                 parallel.get('pipeline', {}).get('repeats', 1))
  loss, params = train(prog, lm_batches(1))
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
  assert max_abs_diff(params, ref_params) < 1e-5


def test_evaluation_equals_one_device():
  optim = dict(LINEAR_OPTIM, grad_accum_steps=4)
  sums = []
  for parallel, devices in ((ONE_DEVICE, one_device()), (_pp({'stage': 2, 'data': 4}), None)):
    prog = program(experiment('llama', MODEL, parallel=parallel, optim=optim), devices)
    batch = {k: jax.device_put(v, prog.batch_sharding) for k, v in lm_batches(1)[0].items()}
    sums.append(jax.tree.map(float, prog.eval_step(prog.init_state()['params'], batch)))
  assert sums[0].keys() == sums[1].keys()
  for k in sums[0]:
    np.testing.assert_allclose(sums[1][k], sums[0][k], rtol=1e-6)


@pytest.mark.slow
def test_twenty_adamw_steps_track_one_device():
  optim = dict(OPTIM, grad_accum_steps=4)
  ref, _ = train(program(experiment('llama', MODEL, parallel=ONE_DEVICE, optim=optim),
                         one_device()), lm_batches(20))
  losses, _ = train(program(experiment('llama', MODEL, parallel=_pp({'stage': 2, 'data': 4}),
                                       optim=optim)), lm_batches(20))
  np.testing.assert_allclose(losses, ref, atol=1e-4, rtol=0)
  assert losses[-1] < losses[0] - 0.1


def test_pipelined_dropout_differs_between_microbatches_and_repeats_by_step():
  """Two identical micro-batches get different masks; the same step draws the same ones."""
  model = dict(MODEL, residual_dropout=0.5)
  optim = dict(LINEAR_OPTIM, grad_accum_steps=2)
  prog = program(experiment('llama', model, parallel=_pp({'stage': 2, 'data': 4}), optim=optim))
  b = lm_batches(1, batch=4)[0]
  batch = {k: np.concatenate([v, v]) for k, v in b.items()}  # micro-batch 1 repeats 0
  state = prog.init_state()
  params = state['params']

  def hidden(params, key):
    model = nnx.merge(prog.graphdef, params, with_dropout_key(prog.rest, key))
    return model(batch['inputs'], segment_ids=batch['segment_ids'],
                 positions=batch['positions'], deterministic=False).logits

  f = jax.jit(prog.layout.wrap(hidden))
  out = np.asarray(f(params, jax.random.key(1)))
  assert np.max(np.abs(out[:4] - out[4:])) > 1e-3
  np.testing.assert_array_equal(out, np.asarray(f(params, jax.random.key(1))))
  assert np.max(np.abs(out - np.asarray(f(params, jax.random.key(2))))) > 1e-3


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize('fam,model,parallel,optim,field', [
    ('transformer_xl', dict(num_layers=2), {'stage': 2}, {}, 'parallel.mesh.stage'),
    ('llama', dict(MODEL, reversible=True), {'stage': 2}, {}, 'parallel.mesh.stage'),
    ('llama', dict(MODEL, scan_layers=False), {'stage': 2}, {}, 'model.scan_layers'),
    ('llama', dict(MODEL, num_layers=6), {'stage': 4}, {}, 'model.num_layers'),
    ('llama', MODEL, {'stage': 2, 'repeats': 2}, {'grad_accum_steps': 1},
     'optim.grad_accum_steps'),
    ('llama', dict(MODEL, attention=dict(LLAMA['attention'], impl='ring')),
     {'stage': 2, 'context': 2}, {}, 'parallel.mesh.context'),
    ('mixtral', MIXTRAL, {'stage': 2, 'expert': 2}, {}, 'parallel.mesh.expert'),
    ('llama', MODEL, {'repeats': 2}, {}, 'parallel.pipeline.repeats'),
])
def test_what_the_pipeline_cannot_run_is_refused_at_config_time(fam, model, parallel, optim,
                                                                 field):
  parallel = dict(parallel)
  repeats = parallel.pop('repeats', 1)
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    experiment(fam, model, parallel=_pp(parallel, repeats), optim=optim)


def test_stage_from_the_rest_of_the_devices_is_checked_with_the_mesh():
  """parallel.mesh.stage=-1 is only known on the mesh: TrainProgram refuses it there."""
  exp = experiment('llama', dict(MODEL, num_layers=6),
                   parallel=dict(preset='dp_fsdp_tp', mesh={'stage': -1, 'data': 2}))
  with pytest.raises(ConfigError, match=r'model\.num_layers'):
    program(exp)
  assert make_mesh(exp.parallel, jax.devices()).shape['stage'] == 4


def test_the_train_command_logs_the_one_device_losses_under_a_circular_pipeline(tmp_path):
  """`python -m jaxformer.train` on pp2 x dp4, circular (R = 2, M = 2), configs/llama.py, with
  the layout named in one switch (`parallel.layout`)."""
  from test_topology import LLAMA_TINY, _cli_losses  # pylint: disable=import-outside-toplevel
  common = (*LLAMA_TINY, '--config.model.num_layers=4', '--config.optim.grad_accum_steps=2')
  one = _cli_losses(str(tmp_path / 'one'), 1, *common)
  piped = _cli_losses(str(tmp_path / 'pp'), 8, *common, '--config.parallel.layout=pp2_dp4',
                      '--config.parallel.pipeline.repeats=2')
  assert sorted(piped) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([piped[s] for s in one], list(one.values()), atol=1e-5, rtol=0)
